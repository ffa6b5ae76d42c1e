"""A connection to the prediction log that one component keeps for itself.

The writer has its own thread and connection; the components that read or write the
log from request threads and the watch loop (labels: serving/predlog/feedback.py;
canary stops: serving/predlog/canary_stops.py) each keep one connection too, opened
when first needed and used under a lock. After an error it is closed and dropped, so
that the next use opens a fresh one: a database that restarted, or a connection the
network broke, costs the calls made meanwhile and the first one after (which finds
the old connection broken), and no more.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from serving.predlog.store import LogStore, open_store


class OwnConnection:
    """The log at `url` through one connection, opened on first use (`create`: as
    `open_store`'s). `lock` is reentrant: a caller may hold it around a use and state
    of its own that must not interleave with other threads'. Uses do not nest: an
    inner one that fails drops the connection the outer one holds."""

    def __init__(self, url: str, create: bool = True):
        self.url, self.create = url, create
        self.store: LogStore | None = None
        self.lock = threading.RLock()
        self.closed = False

    @contextmanager
    def using(self) -> Iterator[LogStore]:
        """The connection, the lock held; closed and dropped if the block raises."""
        with self.lock:
            if self.closed:
                raise RuntimeError(f"the prediction log's connection to {self.url} is "
                                   "closed (the service is stopping)")
            try:
                if self.store is None:
                    self.store = open_store(self.url, create=self.create)
                yield self.store
            except BaseException:
                self._drop()
                raise

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self._drop()

    def _drop(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
