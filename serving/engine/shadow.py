"""Shadow mode: a challenger bundle (`TEXTOPS_CHALLENGER`) scores every request the
champion answered, off the request path, and its answers are logged under the same
request id, so that labels arriving through /feedback compare the two models on the
same requests (pipeline/promotion/controller.py decides on them).

The request path only offers the request to a bounded queue and returns: a full
queue drops it and counts the texts (`textops_shadow_texts{outcome="dropped"}`), it
never waits. One thread takes what is queued, as one batch of up to
`max_batch_size` texts, and runs the challenger on it with onnxruntime (which
releases the GIL), one intra-op thread, at the lowest CPU priority (nice 19): the
request path's threads go first, and when the machine is saturated the shadow falls
behind and drops requests (counted) rather than slow the answers. Scored and
agreeing texts are counted too: the rate of `agreed` over `scored` is how often the
challenger gives the champion's label.

A classifier's requests (texts or images) are scored; a next-word service has no
shadow mode yet. An image challenger must take images as the champion's spec
prepares them, since the champion's decoded pixels are what it is given.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import TYPE_CHECKING

import numpy as np

from serving.bundle import BundleError
from serving.engine.following import load_warm
from serving.engine.source import BundleSource

if TYPE_CHECKING:
    from serving.bundle import Bundle
    from serving.monitoring.metrics import ServiceMetrics
    from serving.predlog.writer import PredictionLog
    from serving.settings import Settings

log = logging.getLogger("serving")
STOP = None


def load_challenger(settings: Settings, champion: Bundle, in_shadow: bool,
                    workers: int = 1) -> Bundle:
    """The challenger bundle, verified and warmed as a served one is (in shadow, on
    one thread of its own; in a canary it answers users, with the champion's
    threads); BundleError when it cannot stand beside `champion`."""
    source = BundleSource(settings.challenger, settings.cache_dir)
    path = source.fetch(source.identity())
    if in_shadow:
        settings = settings.model_copy(update={"intra_op_threads": 1})
    challenger = load_warm(path, settings, workers)
    if challenger.decoder is not None or champion.decoder is not None:
        raise BundleError(f"{settings.challenger}: a challenger (shadow or canary) is a "
                          "classifier's; next-word models have no challenger mode yet")
    if challenger.task.name != champion.task.name or \
            challenger.label_names != champion.label_names:
        raise BundleError(f"{settings.challenger}: a challenger must answer the champion's "
                          f"question ({champion.task.name}, labels "
                          f"{', '.join(champion.label_names)})")
    if champion.task.items == "images" and \
            challenger.meta.get("image") != champion.meta.get("image"):
        raise BundleError(f"{settings.challenger}: its image spec differs from the "
                          "champion's, whose decoded pixels it would be given")
    return challenger


class Shadow:
    """The challenger and the thread that scores the queued requests."""

    def __init__(self, challenger: Bundle, metrics: ServiceMetrics,
                 prediction_log: PredictionLog | None, capacity: int, max_batch: int):
        self.challenger, self.prediction_log = challenger, prediction_log
        self.max_batch = max_batch
        self.queue: queue.Queue = queue.Queue(maxsize=capacity)
        self.scored = metrics.shadow.labels("scored")
        self.dropped = metrics.shadow.labels("dropped")
        self.agreed = metrics.shadow.labels("agreed")
        self.thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self.thread.start()

    @property
    def version(self) -> str:
        return self.challenger.version

    def offer(self, request_id: str, items: list, champion_probs: np.ndarray) -> None:
        """Queue a request the champion answered; never blocks."""
        try:
            self.queue.put_nowait((request_id, items, champion_probs))
        except queue.Full:
            self.dropped.inc(len(items))

    def close(self, timeout: float = 10) -> None:
        try:
            self.queue.put(STOP, timeout=timeout)
        except queue.Full:
            return
        self.thread.join(timeout)

    def _run(self) -> None:
        try:  # Linux: a thread's own niceness, by its id; elsewhere it runs as it is
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            log.warning("shadow: cannot lower the challenger thread's priority")
        while True:
            batch = self._take()
            if batch is STOP:
                return
            try:
                self._score(batch)
            except Exception:  # noqa: BLE001 - the challenger never fails a request
                log.exception("shadow: the challenger %s failed on a batch", self.version)
                self.dropped.inc(sum(len(items) for _, items, _ in batch))

    def _take(self) -> list | None:
        """The requests waiting, up to `max_batch` texts (at least one request)."""
        first = self.queue.get()
        if first is STOP:
            return STOP
        batch, texts = [first], len(first[1])
        while texts < self.max_batch:
            try:
                entry = self.queue.get_nowait()
            except queue.Empty:
                break
            if entry is STOP:  # finish this batch, then stop
                self.queue.put(STOP)
                break
            batch.append(entry)
            texts += len(entry[1])
        return batch

    def _score(self, batch: list) -> None:
        items = [item for _, request_items, _ in batch for item in request_items]
        probs = self.challenger.predict_proba(items, batch_size=max(len(items), 1))
        start = 0
        for request_id, request_items, champion_probs in batch:
            mine = probs[start:start + len(request_items)]
            start += len(request_items)
            if self.prediction_log is not None:
                self.prediction_log.record_shadow(request_id, self.challenger, mine)
            self.agreed.inc(int((mine.argmax(1) == champion_probs.argmax(1)).sum()))
        self.scored.inc(len(items))

