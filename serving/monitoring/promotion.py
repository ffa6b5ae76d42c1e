"""The promotion controller's latest decision on the served model, for `GET /metrics`.

`textops decide` (pipeline/promotion/controller.py) records every decision, acted on
or not, as a run of MLflow's `promotion-decisions` experiment: the two registry
versions, the outcome, and the evidence (labels, e-value, p-value, effect and its
interval). When the service has a registry (`MLFLOW_TRACKING_URI` set), its watch
loop reads the newest decision on the served model's name, at most every
`REFRESH_S` seconds and off the event loop, and scrapes show it:

- `textops_promotion_evidence{champion, challenger, mode, outcome, acted, quantity}`: each
  figure of the evidence (`quantity`: labels, e_value, p_value, effect, lower, upper,
  and the counts: n, b, c in shadow mode, champion_n, champion_right, challenger_n,
  challenger_right in canary mode);
- `textops_promotion_decided_timestamp_seconds{champion, challenger, outcome}`.

An alert on `outcome="rollback"`, or a dashboard of the e-value as labels arrive,
needs nothing else. `acted` says whether the aliases moved on it (a `continue`
never moves them); dry runs (`textops decide --dry-run`) are left out. Without a
registry, or before any decision, neither is exported.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("serving")
EXPERIMENT = "promotion-decisions"  # the controller's MLflow experiment
REFRESH_S = 10.0
QUANTITIES = ("labels", "e_value", "p_value", "effect", "lower", "upper", "n", "b", "c",
              "champion_n", "champion_right", "challenger_n", "challenger_right")


def latest_decision(model_name: str) -> dict | None:
    """The newest decision recorded on `model_name`: {champion, challenger, mode,
    outcome, decided_at (unix seconds), and the evidence's figures}; None if none."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    # MLflow's filter language has no escapes: a name with a quote goes in double ones
    quoted = f'"{model_name}"' if "'" in model_name else f"'{model_name}'"
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.model = {quoted} and tags.dry_run = 'false'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    run = runs[0]
    tags = run.data.tags
    return {"champion": tags.get("champion", ""), "challenger": tags.get("challenger", ""),
            "mode": tags.get("mode", ""), "outcome": tags.get("outcome", ""),
            "acted": tags.get("acted", ""),
            "decided_at": run.info.start_time / 1000,
            **{k: v for k, v in run.data.metrics.items() if k in QUANTITIES}}


class PromotionEvidence:
    """The latest decision read from the registry, for scrapes."""

    def __init__(self):
        self.decision: dict | None = None
        self.checked = -float("inf")  # time.monotonic() of the last reading
        self.lock = threading.Lock()
        self.busy = False  # a reading is under way (a slow registry: one at a time)

    @staticmethod
    def enabled() -> bool:
        # Only with a registry configured: MLflow's default store would be a new
        # database in the service's working directory.
        return bool(os.environ.get("MLFLOW_TRACKING_URI"))

    def refresh(self, model_name: str, every_s: float = REFRESH_S) -> None:
        """Read the newest decision on `model_name` again, unless it was read less than
        `every_s` ago. Blocking: the watch loop calls it in a thread."""
        with self.lock:
            if self.busy or time.monotonic() - self.checked < every_s:
                return
            self.busy, self.checked = True, time.monotonic()
        try:
            self.decision = latest_decision(model_name)
        except Exception as err:  # noqa: BLE001 - the registry is briefly unreachable
            log.warning("cannot read the promotion decisions on %s: %s", model_name, err)
        finally:
            self.busy = False

    def collect(self):
        decision = self.decision
        if decision is None:
            return
        versions = [decision["champion"], decision["challenger"]]
        evidence = GaugeMetricFamily(
            "textops_promotion_evidence", "the promotion controller's latest decision on "
            "the served model: each figure of its evidence",
            labels=["champion", "challenger", "mode", "outcome", "acted", "quantity"])
        for quantity in QUANTITIES:
            if quantity in decision:
                evidence.add_metric([*versions, decision["mode"], decision["outcome"],
                                     decision["acted"], quantity], decision[quantity])
        yield evidence
        decided = GaugeMetricFamily(
            "textops_promotion_decided_timestamp_seconds", "when the latest decision on "
            "the served model was made", labels=["champion", "challenger", "outcome"])
        decided.add_metric([*versions, decision["outcome"]], decision["decided_at"])
        yield decided
