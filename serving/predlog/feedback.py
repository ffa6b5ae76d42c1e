"""Labels into the prediction log: the store behind POST /feedback.

Labels arrive on request threads, not on the writer's (serving/predlog/writer.py):
`FeedbackStore` stores them through a connection of its own, under a lock. A label
may name an answer that is not in the log yet (still in a writer's queue, this
process's, a sibling worker's or another replica's): `LogBehind` then tells the client
to try again, rather than that the answer is unknown.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from serving.predlog.connection import OwnConnection
from serving.predlog.store import LogStore
from serving.request_ids import issued_within

# A label for an answer this young may reach the log before the answer does (each
# replica writes every 0.1 s, later when busy): "try again", not "unknown".
RECENT_ANSWER_S = 30.0
# How long a label waits for another process's writer to log its answer before the
# client is told to try again: a worker beside this one writes every 0.1 s.
SIBLING_WAIT_S = 1.0


class LogBehind(RuntimeError):
    """The writer has not caught up with the answers given so far: a label may refer
    to one not yet written, so it cannot be told apart from an unknown one."""


class FeedbackStore:
    """The log's labels, stored on the caller's thread through a connection of its
    own; `on_stored(store)` runs after labels were stored (the writer's refresh of the
    live figures)."""

    def __init__(self, url: str, on_stored: Callable[[LogStore], None]):
        self.url = url
        self.on_stored = on_stored
        self.connection = OwnConnection(url)  # labels arrive on request threads

    def record(self, items: list[tuple[str, int, str]], siblings: bool
               ) -> list[tuple[str, int]]:
        """Store labels (request_id, position, label), all or none; returns the pairs
        with no logged prediction (nothing stored then). `siblings`: other workers of
        this service write to this log. Raises when the database fails."""
        deadline = time.monotonic() + SIBLING_WAIT_S
        while True:
            missing, unwritten, absent = self._record(items)
            # Another worker of this service (or a replica) may have answered a missing
            # request and be about to write it: our own ids say how recent they are; a
            # client's cannot, so with sibling workers an id not in the log at all
            # waits a moment too (the lock is not held meanwhile).
            if not (unwritten or (absent and siblings)) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if unwritten:  # answered by another replica that has not written it yet
            raise LogBehind(f"request_id {unwritten[0]!r} was answered less than "
                            f"{RECENT_ANSWER_S:.0f} s ago and is not in the log yet")
        return missing

    def _record(self, items: list[tuple[str, int, str]]
                ) -> tuple[list[tuple[str, int]], list[str], list[str]]:
        """One attempt: the pairs with no logged prediction (nothing stored then), the
        missing ids of ours issued recently, and the missing ids not logged at all."""
        with self.connection.using() as store:
            for _ in range(3):
                missing = store.record_feedback(items, time.time())
                logged = {r: store.positions(r) for r in dict.fromkeys(r for r, _ in missing)}
                # A pair missing at the first read but logged at the second was
                # written in between (another worker's writer committed): again,
                # so that an answer being written is never told "unknown".
                if not any(position in logged[r] for r, position in missing):
                    break
            absent = [r for r, positions in logged.items() if not positions]
            unwritten = [r for r in absent if issued_within(r, RECENT_ANSWER_S)]
            if not missing:
                self.on_stored(store)
            return missing, unwritten, absent

    def close(self) -> None:
        self.connection.close()
