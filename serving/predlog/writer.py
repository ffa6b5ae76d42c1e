"""The service's prediction log writer: `PredictionLog`, its queue and its thread.

The service writes through `PredictionLog`: a request only puts a tuple on a bounded
queue (a full queue drops the entry and counts it, never the request); one thread turns
entries into rows (the normalisation in a child process, off the service's GIL) and
inserts them in batches, one transaction each (with the log's keys set, their texts
encrypted here too: serving/predlog/crypto.py). When the database fails, batches are
dropped and counted, the error is logged once and the connection is retried with
backoff; retention (by age and by row count) and the live-quality figures are the same
thread's periodic work.

Labels (POST /feedback) go through `PredictionLog.feedback`: it waits until the writer
has caught up with the answers given so far, then stores them through
serving/predlog/feedback.py. The tables are serving/predlog/store.py's, the rows
serving/predlog/rows.py's; the pipeline reads them with serving/predlog/reader.py,
which does not import this module.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING

from serving.monitoring.live_stats import LiveStats
from serving.predlog.crypto import LogCipher, check_store
from serving.predlog.feedback import FeedbackStore, LogBehind
from serving.predlog.normalizer import Normalizing
from serving.predlog.rows import ShadowAnswers, prediction_rows, sampled, shadow_rows
from serving.predlog.store import LogStore, check_url, open_store, redacted

if TYPE_CHECKING:
    import numpy as np

    from serving.bundle import Bundle
    from serving.monitoring.metrics import ServiceMetrics

# The name these lines have carried since before the log was split into modules:
# operators' filters on the service's log match it.
log = logging.getLogger("serving.prediction_log")

STOP = object()


class Unavailable(Exception):
    """The database failed a moment ago; the next try waits for the backoff."""


class PredictionLog:
    """The service's log writer and feedback store (see the module docstring)."""

    def __init__(self, url: str, metrics: ServiceMetrics, queue_size: int = 10_000,
                 sample: float = 1.0, retention_days: float = 30,
                 max_rows: int = 1_000_000, feedback_window: int = 1000,
                 batch_size: int = 2000, linger_s: float = 0.1, prune_interval_s: float = 60,
                 stats_interval_s: float = 10, retry_s: tuple[float, float] = (0.2, 5.0),
                 cipher: LogCipher | None = None):
        self.url = check_url(url)
        self.cipher = cipher  # None: the texts are stored as they are
        self.metrics = metrics
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.sample, self.batch_size, self.linger_s = sample, batch_size, linger_s
        self.max_age_s, self.max_rows = retention_days * 86400, max_rows
        self.feedback_window = feedback_window
        self.served_version = ""  # the bundle being served: live accuracy is its own
        self.prune_interval_s, self.stats_interval_s = prune_interval_s, stats_interval_s
        self.stats_due = False  # set: read the live figures at the writer's next turn
        self.siblings = False  # set: other workers of this service write to this log
        self.retry_first_s, self.retry_max_s = retry_s
        # the writer thread's connection and its failure state
        self.store: LogStore | None = None
        self.failing: str | None = None  # the error being waited out, logged once
        self.dropped_while_failing = 0
        self.retry_delay, self.retry_at = self.retry_first_s, 0.0
        self.feedback_store = FeedbackStore(self.url, self._refresh_stats)
        self.queue_full = metrics.log_dropped.labels("queue_full")
        self.normalizing = Normalizing()
        self.thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)

    @classmethod
    def from_settings(cls, settings, metrics: ServiceMetrics) -> PredictionLog:
        return cls(settings.prediction_log, metrics, queue_size=settings.prediction_log_queue,
                   sample=settings.prediction_log_sample,
                   retention_days=settings.prediction_log_retention_days,
                   max_rows=settings.prediction_log_max_rows,
                   feedback_window=settings.feedback_window,
                   cipher=settings.log_cipher())

    def start(self) -> None:
        self.thread.start()

    def close(self, timeout: float = 10) -> None:
        """Write what is queued (within `timeout`), then stop the thread."""
        try:
            self.queue.put(STOP, timeout=timeout)
        except queue.Full:
            log.warning("prediction log: the queue did not drain in %s s; stopping", timeout)
            return
        self.thread.join(timeout)
        self.feedback_store.close()

    # ------------------------------------------------------------ the request path

    def record(self, request_id: str, bundle: Bundle, texts: list[str],
               probs: np.ndarray) -> None:
        """Queue one answered request; never blocks, never raises for a full queue."""
        if not sampled(request_id, self.sample):
            return
        try:
            self.queue.put_nowait((request_id, time.time(), bundle, texts, probs))
        except queue.Full:
            self.queue_full.inc(len(texts))

    def record_shadow(self, bundle: Bundle, requests: list[tuple[str, int]],
                      probs: np.ndarray | list) -> None:
        """Queue a challenger's answers to `requests` (request_id, how many texts) as
        one entry: requests this log samples (the challenger is offered only those,
        serving/engine/challenger.py), in at most half the queue: under load the
        champion's rows are kept first."""
        answered = ShadowAnswers(time.time(), bundle, requests, probs)
        try:
            if self.queue.qsize() >= self.queue.maxsize // 2:  # the champion's rows first
                raise queue.Full
            self.queue.put_nowait(answered)
        except queue.Full:
            self.queue_full.inc(len(answered.probs))

    def refresh_stats(self) -> None:
        """Read the live figures again now, not at the next interval: another worker
        has stored labels."""
        self.stats_due = True
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(threading.Event())  # wakes the writer thread

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until what was queued before this call is written (or dropped)."""
        done = threading.Event()
        try:
            self.queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    # ------------------------------------------------------------ feedback

    def feedback(self, items: list[tuple[str, int, str]]) -> list[tuple[str, int]]:
        """Store labels (request_id, position, label), all or none, after the writer
        has caught up with the predictions answered so far; returns the pairs with no
        logged prediction (nothing stored then). Raises when the database fails."""
        if not self.flush():
            raise LogBehind("the prediction log is still writing earlier answers")
        return self.feedback_store.record(items, self.siblings)

    def _stats(self, store: LogStore) -> LiveStats:
        as_of = time.monotonic()
        stats = store.live_stats(self.served_version, self.feedback_window,
                                 time.time() - self.max_age_s)
        stats.as_of = as_of
        return stats

    # ------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        next_prune = next_stats = 0.0
        stats_of = None  # the model version the live figures are about
        stop = False
        while not stop:
            now = time.monotonic()  # first thing: a restarted service shows its figures
            if now >= next_prune and self._maintain(self._prune):
                next_prune = now + self.prune_interval_s
            # a new model gets figures of its own at once, not the old one's for 10 s
            version = self.served_version
            if now >= next_stats or version != stats_of or self.stats_due:
                self.stats_due = False
                if self._maintain(self._refresh_stats):
                    next_stats, stats_of = now + self.stats_interval_s, version
            entries, markers, stop = self._take()
            if entries:
                self._write(entries)
            for marker in markers:
                marker.set()
        if self.store is not None:
            self.store.close()
        self.normalizing.close()

    def _take(self) -> tuple[list[tuple], list[threading.Event], bool]:
        """The entries waiting (at least one, or a second's wait), flush markers, stop."""
        entries, markers = [], []
        try:
            item = self.queue.get(timeout=1.0)
        except queue.Empty:
            return entries, markers, False
        if item is not STOP and not isinstance(item, threading.Event):
            # Let a batch gather: one transaction and one wake-up of this thread per
            # batch, not per request (each wake-up takes the GIL from the event loop).
            time.sleep(self.linger_s)
        while True:
            if item is STOP:
                return entries, markers, True
            if isinstance(item, threading.Event):
                markers.append(item)
            else:
                entries.append(item)
            if len(entries) >= self.batch_size:
                return entries, markers, False
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return entries, markers, False

    def _connection(self) -> LogStore:
        if self.store is None:
            if self.failing and time.monotonic() < self.retry_at:
                raise Unavailable(self.failing)
            store = open_store(self.url)
            try:  # encrypted rows and no key, or not this one: write nothing (see crypto)
                check_store(store, self.cipher)
            except Exception:
                store.close()
                raise
            self.store = store
        return self.store

    def _write(self, entries: list[tuple]) -> None:
        shadows = [entry for entry in entries if isinstance(entry, ShadowAnswers)]
        answers = [entry for entry in entries if not isinstance(entry, ShadowAnswers)]
        if answers:  # first: a challenger's rows sit beside the champion's
            self._write_answers(answers)
        if shadows:
            try:
                self._connection().write_shadow(
                    [row for s in shadows for row in shadow_rows(s)])
            except Exception as err:  # noqa: BLE001 - the log drops entries, never fails
                self._failed(err, sum(len(s.probs) for s in shadows))
                return
            self._recovered()

    def _write_answers(self, entries: list[tuple]) -> None:
        count = sum(len(entry[3]) for entry in entries)
        try:
            normalized = self.normalizing(entries)
            rows = [row for entry, texts in zip(entries, normalized, strict=True)
                    for row in prediction_rows(*entry, normalized=texts,
                                               cipher=self.cipher)]
            self._connection().write_predictions(rows)
        except Exception as err:  # noqa: BLE001 - the log drops entries, never fails
            self._failed(err, count)
            return
        self.metrics.log_written.inc(count)
        self._recovered()

    def _maintain(self, work) -> bool:
        """Run periodic work on the writer's connection; False if the database failed."""
        try:
            work(self._connection())
        except Exception as err:  # noqa: BLE001
            self._failed(err, 0)
            return False
        self._recovered()
        return True

    def _prune(self, store: LogStore) -> None:
        deleted = store.prune(time.time(), self.max_age_s, self.max_rows)
        if deleted:
            log.info("prediction log: %d predictions past retention deleted", deleted)

    def _refresh_stats(self, store: LogStore) -> None:
        self.metrics.live_quality.update(self._stats(store))

    def _failed(self, err: Exception, dropped: int) -> None:
        """Count the dropped rows; log the first error of an outage, back off."""
        if dropped:
            self.metrics.log_dropped.labels("error").inc(dropped)
            self.dropped_while_failing += dropped
        if isinstance(err, Unavailable):
            return
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.failing is None:
            # psycopg2 raises a second error ("connection already closed") while
            # leaving the transaction of a connection the server dropped: name the first
            cause = err.__context__ or err
            self.failing = f"{type(cause).__name__}: {' '.join(str(cause).split())}"
            log.error("prediction log %s failed (%s); dropping entries and retrying until "
                      "it works again", redacted(self.url), self.failing)
            self.retry_delay = self.retry_first_s
        else:
            self.retry_delay = min(self.retry_delay * 2, self.retry_max_s)
        self.retry_at = time.monotonic() + self.retry_delay

    def _recovered(self) -> None:
        if self.failing is not None:
            log.warning("prediction log %s recovered: writing again (%d predictions "
                        "dropped while it failed)", redacted(self.url), self.dropped_while_failing)
            self.failing, self.dropped_while_failing = None, 0
