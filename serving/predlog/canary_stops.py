"""Canary stops shared through the prediction log.

A canary's guards (serving/engine/canary.py `Guard`) see only the requests of their
own server process. The first process whose guards trip records the stop in the log
(`canary_stops`, serving/predlog/schema.py); every worker and replica sharing the log
reads it on its next watch tick and stops its canary too, a process that starts later
does not start that challenger's canary, and the promotion controller rolls the
challenger back with the guard's reason as its evidence
(pipeline/promotion/controller.py). A stop is the challenger's, whichever champion
it stood beside: failures are its own, and a p99 past the champion's is a fact of
its model.

The calls block (a database round trip) and run off the event loop. A stop that
cannot be written is kept and written again with the next read, so that a database
outage delays it but never loses it; an outage is logged once, and its end.
"""

from __future__ import annotations

import logging
import time

from serving.predlog.connection import OwnConnection
from serving.predlog.schema import CANARY_STOPPED

log = logging.getLogger("serving")


def is_missing_table(err: Exception) -> bool:
    """Whether `err` says that the log, or its `canary_stops` table, is not there yet
    (no server of this version has opened it): then it holds no stop."""
    text = str(err)
    return ("canary_stops" in text and ("no such table" in text or "does not exist" in text)
            ) or "no prediction log there" in text


class CanaryStops:
    """The log's canary stops, through one connection of their own."""

    def __init__(self, url: str):
        self.url = url
        self.connection = OwnConnection(url, create=False)
        self.pending: dict[str, tuple[str, str, float]] = {}  # not written yet
        self.failing = False  # both under the connection's lock

    def record(self, challenger: str, champion: str, reason: str) -> None:
        """Record that the guards stopped `challenger`'s canary beside `champion`; kept
        and retried by the next `reason` or `flush` if the database fails now."""
        with self.connection.lock:
            self.pending.setdefault(challenger, (champion, reason, time.time()))
        self.flush()

    def flush(self) -> None:
        """Write the stops not written yet (errors are logged, the stops kept)."""
        try:
            self._run(lambda store: None)
        except Exception:  # noqa: BLE001, S110 - logged by _run, retried later
            pass

    def reason(self, challenger: str) -> str | None:
        """Why `challenger`'s canary was stopped, if it was; raises when the database
        fails (after logging it, once per outage)."""
        rows = self._run(lambda store: store.rows(CANARY_STOPPED, (challenger,)))
        return rows[0][0] if rows else None

    def _run(self, work):
        with self.connection.lock:
            if self.connection.closed:
                return []
            try:
                with self.connection.using() as store:
                    for challenger, (champion, reason, created) in list(self.pending.items()):
                        store.record_canary_stop(challenger, champion, created, reason)
                        del self.pending[challenger]
                    found = work(store)
            except Exception as err:
                if is_missing_table(err) and not self.pending:
                    # nothing recorded yet: the writer creates the table at its start
                    # (till then each call opens a connection again)
                    return []
                if not self.failing:
                    self.failing = True
                    log.warning("canary: the prediction log's canary stops cannot be read "
                                "or written (%s: %s); retrying on every watch tick",
                                type(err).__name__, err)
                raise
            if self.failing:
                self.failing = False
                log.warning("canary: the prediction log's canary stops work again")
            return found

    def close(self) -> None:
        self.connection.close()
