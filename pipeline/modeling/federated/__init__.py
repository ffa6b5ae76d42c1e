"""Federated training with Flower (`trainer=federated`): partition.py deals the
training rows to clients, client.py trains on one client's rows, server.py averages
and validates, run.py runs the rounds in one process or across client processes."""

import logging
import os

# Flower reports usage to its developers' server unless told not to; nothing here
# reaches the internet, and a run should not try.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import flwr.common.logger  # noqa: E402,F401 - it sets its logger to DEBUG on import

from pipeline import logs  # noqa: E402

if not logs.verbose():
    logging.getLogger("flwr").setLevel(logs.NOISY_LOGGERS["flwr"])
