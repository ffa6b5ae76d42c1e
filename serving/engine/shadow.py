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

A classifier's requests (texts or images) are scored, and a next-word service's: the
challenger computes each text's top words as the batcher does for the champion
(serving/engine/batcher.py `infer`), and its row is logged as the champion's
next-word rows are (its top word as the label, `{"next_words": [[word, p], ...]}`),
so a label (the word typed next) pairs with both top words; `agreed` counts the
texts whose top words are the same. /predict and V2 answers are offered with their
`k`; a /generate with its prompt and the word the champion put first after it (what
a label of a continuation is compared with), and the challenger logs its own top
word beside it: one prefill, where decoding a continuation of its own would cost a
model call per token and give nothing more to compare a label with.

What may stand beside the champion (`check_beside`): a model of the same task; for
a classifier, the same labels (and for images the same image spec, since the
champion's decoded pixels are what it is given); for a next-word model, a tokenizer
that normalises and splits words as the champion's does (labels are stored by the
champion's rules, and the two top words are compared as strings), while its
vocabulary and context may differ: a prompt that fits the champion's context but
not the challenger's keeps its latest tokens (`infer_next_words`).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from typing import TYPE_CHECKING

import numpy as np

from serving.bundle import BundleError
from serving.engine.batcher import infer
from serving.engine.following import load_warm
from serving.engine.source import BundleSource
from serving.predlog.rows import next_word_answers

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
    check_beside(challenger, champion, settings.challenger)
    return challenger


def check_beside(challenger: Bundle, champion: Bundle, spec: str) -> None:
    """BundleError naming `spec` when `challenger` does not answer the champion's
    question in terms its answers can be compared in (the module's docstring)."""
    if challenger.task.name != champion.task.name:
        raise BundleError(f"{spec}: a challenger must answer the champion's question: "
                          f"it is a {challenger.task.name} model, the champion a "
                          f"{champion.task.name} one")
    if champion.decoder is not None:
        if word_rules(challenger) != word_rules(champion):
            raise BundleError(f"{spec}: its tokenizer normalises or splits words "
                              "otherwise than the champion's, by which labels are stored: "
                              "their top words would not compare")
        return
    if challenger.label_names != champion.label_names:
        raise BundleError(f"{spec}: a challenger must answer the champion's question "
                          f"({champion.task.name}, labels "
                          f"{', '.join(champion.label_names)})")
    if champion.task.items == "images" and \
            challenger.meta.get("image") != champion.meta.get("image"):
        raise BundleError(f"{spec}: its image spec differs from the champion's, whose "
                          "decoded pixels it would be given")


def word_rules(bundle: Bundle) -> tuple:
    """What a next-word bundle's tokenizer makes of a text before its vocabulary is
    looked up: its normalizer and pre-tokenizer, as tokenizer.json holds them."""
    saved = json.loads(bundle.decoder.inputs.tokenizer.to_str())
    return saved.get("normalizer"), saved.get("pre_tokenizer")


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

    def offer(self, request_id: str, items: list, champion: np.ndarray | list[str],
              k: int = 1) -> None:
        """Queue a request the champion answered; never blocks. `champion`: its
        probabilities (a classifier), or each text's top word (a next-word model,
        whose challenger logs `k` next words per text)."""
        try:
            self.queue.put_nowait((request_id, items, champion, k))
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
                self.dropped.inc(sum(len(entry[1]) for entry in batch))

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
        items = [item for _, request_items, _, _ in batch for item in request_items]
        if self.challenger.decoder is not None:  # each text's top words, as the batcher's
            answers, _ = infer(self.challenger, items, max(k for *_, k in batch))
        else:
            answers = self.challenger.predict_proba(items, batch_size=max(len(items), 1))
        start = 0
        for request_id, request_items, champion, k in batch:
            mine = answers[start:start + len(request_items)]
            start += len(request_items)
            if self.challenger.decoder is not None:
                mine = next_word_answers([row[:k] for row in mine])
                agreed = sum(label == top for (label, _), top in zip(mine, champion,
                                                                      strict=True))
            else:
                agreed = int((mine.argmax(1) == champion.argmax(1)).sum())
            if self.prediction_log is not None:
                self.prediction_log.record_shadow(request_id, self.challenger, mine)
            self.agreed.inc(agreed)
        self.scored.inc(len(items))
