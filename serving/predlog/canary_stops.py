"""Canary stops shared through the prediction log.

A canary's guards (serving/engine/canary.py `Guard`) see only the requests of their
own server process. The first process whose guards trip records the stop in the log
(`canary_stops`, serving/predlog/schema.py); every worker and replica sharing the log
reads it on its next watch tick and stops its canary too, and the promotion
controller rolls the challenger back with the guard's reason as its evidence
(pipeline/promotion/controller.py). Both calls run off the event loop, through a
connection of their own.
"""

from __future__ import annotations

import threading
import time

from serving.predlog.schema import CANARY_STOPPED
from serving.predlog.store import LogStore, open_store


class CanaryStops:
    """The log's canary stops, read and written through one connection, under a lock."""

    def __init__(self, url: str):
        self.url = url
        self.store: LogStore | None = None
        self.lock = threading.Lock()

    def record(self, challenger: str, champion: str, reason: str) -> None:
        self._run(lambda store: store.record_canary_stop(challenger, champion, time.time(),
                                                         reason))

    def reason(self, challenger: str, champion: str) -> str | None:
        """Why `challenger`'s canary beside `champion` was stopped, if it was."""
        rows = self._run(lambda store: store.rows(CANARY_STOPPED, (challenger, champion)))
        return rows[0][0] if rows else None

    def _run(self, work):
        with self.lock:
            try:
                if self.store is None:
                    self.store = open_store(self.url)
                return work(self.store)
            except Exception:
                if self.store is not None:  # a fresh connection next time
                    self.store.close()
                    self.store = None
                raise

    def close(self) -> None:
        with self.lock:
            if self.store is not None:
                self.store.close()
                self.store = None
