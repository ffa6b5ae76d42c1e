"""Shadow mode: a challenger bundle (`TEXTOPS_CHALLENGER`) scores every request the
champion answered that the prediction log keeps (all of them without a log:
serving/engine/challenger.py), off the request path, and its answers are logged under
the same request id, so that labels arriving through /feedback compare the two models
on the same requests (pipeline/promotion/controller.py decides on them).

The request path only adds the request to a batch and returns. A batch goes to the
worker as one message once it holds `max_batch_size` texts, or about `SEND_S` (twice
that at most) after its first request: a message per request cost the two processes
more CPU than the challenger's scoring itself (bench/bench_shadow.py measures the
whole). Batches of 256 made no difference there that stood out of the runs' spread,
so the batches are the batcher's size. At most `capacity` texts wait
(`TEXTOPS_SHADOW_QUEUE`); a request past that is dropped and its texts counted
(`textops_shadow_texts{outcome="dropped"}`); the request path never waits. A text
classifier's texts go as the token ids the champion's tokenizer made of them when the
challenger's tokenizer.json is the same file (a retrained model of the default
pipeline, whose tokenizer is MiniLM's), rather than the same ids computed twice
(bench/bench_shadow.py measures the shadow's CPU both ways). The
challenger runs in a process of its own (serving/engine/shadow_worker.py, one per
server process, one onnxruntime thread) at the lowest CPU priority: it takes what is
queued, about `max_batch_size` texts at a time, only while the service leaves a core
idle, so when the machine is saturated it falls behind and requests are dropped
(counted) rather than the answers slowed. Its answers come back to the server
process, which logs them. Scored and agreeing texts are counted too: the
rate of `agreed` over `scored` is how often the challenger gives the champion's label;
texts of a batch it failed count as `failed`; the worker's CPU time is
`textops_shadow_cpu_seconds`. A worker that could not load the challenger, or died
(killed, out of memory), leaves the Shadow `dead`, saying why: what is offered to it
then is dropped (counted), and the watch loop stops shadow mode and names the reason
(serving/engine/challenger.py).

A classifier's requests (texts or images) are scored, and a next-word service's: the
challenger computes each text's top words as the batcher does for the champion
(serving/engine/inference.py `infer`), and its row is logged as the champion's
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
import multiprocessing
import os
import queue
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from serving.bundle import BundleError
from serving.engine import shadow_worker
from serving.engine.following import load_warm
from serving.engine.shadow_worker import STOP
from serving.engine.source import BundleSource

if TYPE_CHECKING:
    from serving.bundle import Bundle
    from serving.monitoring.metrics import ServiceMetrics
    from serving.predlog.writer import PredictionLog
    from serving.settings import Settings

log = logging.getLogger("serving")
SEND_S = 0.2  # the longest an offered request waits for others to be sent with


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
    """The challenger's worker process (serving/engine/shadow_worker.py), the queue to
    it (at most `capacity` texts waiting, sent in batches of `max_batch`), and the
    thread that sends it a batch that waited SEND_S and logs what it sends back."""

    def __init__(self, challenger: Bundle, settings: Settings, metrics: ServiceMetrics,
                 prediction_log: PredictionLog | None, capacity: int, max_batch: int):
        self.challenger, self.prediction_log = challenger, prediction_log
        self.capacity, self.max_batch = capacity, max_batch
        # over the batch being filled, the texts waiting, `closing` and `dead`; held
        # while a batch is sent, so that none is sent behind STOP
        self.lock = threading.Lock()
        self.batch: list[tuple] = []
        self.batch_items, self.batch_since = 0, 0.0
        self.waiting = 0  # texts offered and not answered yet, the batch being filled too
        self.scored = metrics.shadow.labels("scored")
        self.dropped = metrics.shadow.labels("dropped")
        self.agreed = metrics.shadow.labels("agreed")
        self.failed = metrics.shadow.labels("failed")
        self.cpu, self.champion_ids = metrics.shadow_cpu, metrics.shadow_ids
        # ids made by a tokenizer with this digest are the challenger's own
        self.tokenizer = getattr(challenger.inputs, "digest", None)  # a text classifier's
        context = multiprocessing.get_context("spawn")  # nothing of the server's state
        # a message holds a text at least: `waiting` is the bound, with room for STOP
        self.requests = context.Queue(maxsize=capacity + 1)
        self.results = context.Queue()
        # Nothing here reads what is queued: once the worker is gone, closing the
        # reader makes a feeder thread blocked on a full pipe fail quietly (`close`).
        self.requests._ignore_epipe = True
        self.closing = False
        self.dead: str | None = None  # why the worker no longer scores, once it does not
        self.hurry = context.Event()  # set on close: a worker within TEXTOPS_SHADOW_CPU
        self.process = context.Process(  # stops resting and scores what is left
            target=shadow_worker.run, name="textops-shadow", daemon=True,
            args=(str(challenger.path), settings.model_copy(update={"intra_op_threads": 1}),
                  self.requests, self.results, max_batch, os.getpid(), self.hurry,
                  self.tokenizer))
        self.process.start()
        self.thread = threading.Thread(target=self._receive, name="shadow", daemon=True)
        self.thread.start()

    @property
    def version(self) -> str:
        return self.challenger.version

    def offer(self, request_id: str, items: list, champion: np.ndarray | list[str],
              k: int = 1, encoded: list | None = None, by: Bundle | None = None) -> None:
        """Add a request the champion answered to the batch for the worker; never
        blocks. `champion`: its probabilities (a classifier), or each text's top word
        (a next-word model, whose challenger logs `k` next words per text). `encoded`:
        the token ids the champion (`by`) made of a text classifier's texts, sent in
        their place when its tokenizer.json is the challenger's."""
        if isinstance(champion, np.ndarray):  # what agreement needs, not every number
            champion = champion.argmax(1).tolist()
        tokenized = (encoded is not None and self.tokenizer is not None and by is not None
                     and getattr(by.inputs, "digest", None) == self.tokenizer)
        if tokenized:
            items = encoded
        with self.lock:
            taken = (self.dead is None and not self.closing
                     and self.waiting + len(items) <= self.capacity)
            if taken:
                if not self.batch:
                    self.batch_since = time.monotonic()
                self.batch.append((request_id, items, champion, k, tokenized))
                self.batch_items += len(items)
                self.waiting += len(items)
                if self.batch_items >= self.max_batch:
                    self._send()
        if not taken:
            self.dropped.inc(len(items))
        elif tokenized:
            self.champion_ids.inc(len(items))

    def _send(self) -> None:
        """Send the batch being filled and begin another (the lock held)."""
        batch, self.batch, self.batch_items = self.batch, [], 0
        if batch:
            self.requests.put_nowait(batch)  # never full: `waiting` bounds it

    def _wait_s(self) -> float:
        """How long the receiving thread may wait before a batch is due to be sent."""
        with self.lock:
            if not self.batch:
                return SEND_S
            return max(0.0, self.batch_since + SEND_S - time.monotonic())

    def _send_due(self) -> None:
        with self.lock:
            if self.batch and time.monotonic() - self.batch_since >= SEND_S:
                self._send()

    def close(self, timeout: float = 10) -> None:
        """Stop the worker once it has scored what is offered (killed after `timeout`,
        or at once when it is full, starved or dead), and leave no thread or queued
        data behind."""
        self.hurry.set()
        with self.lock:
            self.closing = True
            self._send()
            stopping = self.waiting < self.capacity and self.process.is_alive()
            if stopping:
                self.requests.put_nowait(STOP)
        if stopping:
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        end_feeder(self.requests, timeout)
        self.thread.join(timeout)
        if not self.thread.is_alive():
            self.results.close()
            self.results._reader.close()

    def _receive(self) -> None:
        """Log each request the worker scored; count what it could not."""
        try:
            while (why := self._take()) is None:
                self._send_due()
        except Exception as err:  # noqa: BLE001 - nothing reads the worker's answers now
            log.exception("shadow: cannot log the challenger's answers")
            why = f"its answers cannot be logged ({type(err).__name__}: {err})"
        if why and not self.closing:
            with self.lock:  # what it had not answered is dropped, and counted
                self.dead, stranded, self.waiting = why, self.waiting, 0
                self.batch, self.batch_items = [], 0
            self.dropped.inc(stranded)
            log.error("shadow: the challenger %s no longer scores: %s", self.version, why)

    def _take(self) -> str | None:
        """Log or count the worker's next outcome; None while it runs on, else why it
        stopped ("" when told to)."""
        try:  # waking when a batch is due to be sent, if not before
            outcome = self.results.get(timeout=self._wait_s())
        except queue.Empty:
            if self.process.is_alive():
                return None
            return f"its process {self.process.pid} exited (code {self.process.exitcode})"
        if outcome is STOP:
            return ""
        if outcome[0] == "broken":  # it could not load the challenger
            return f"it cannot be loaded: {outcome[2]}"
        # first the CPU and what no longer waits: who reads `scored` finds them counted
        self.cpu.inc(outcome[-1])
        with self.lock:
            self.waiting -= (sum(items for _, items, _ in outcome[1])
                             if outcome[0] == "scored" else outcome[1])
        if outcome[0] == "scored":
            self._log(outcome[1], outcome[2])
        else:
            log.error("shadow: the challenger %s failed: %s", self.version, outcome[2])
            self.failed.inc(outcome[1])
        return None

    def _log(self, requests: list[tuple], answers: np.ndarray | list) -> None:
        """Log the requests' `answers` (shadow_worker.py `score`) and count them."""
        if self.prediction_log is not None:
            self.prediction_log.record_shadow(
                self.challenger, [(request_id, items) for request_id, items, _ in requests],
                answers)
        self.agreed.inc(sum(agreed for *_, agreed in requests))
        self.scored.inc(sum(items for _, items, _ in requests))


def end_feeder(requests, timeout: float) -> None:
    """End `requests`' feeder thread once nothing reads the queue (the worker is gone):
    with the last reader closed, a write it is blocked on fails (quietly: the queue
    ignores EPIPE) and what it still buffers is let go."""
    requests._reader.close()
    requests.close()
    if requests._thread is not None:
        requests._thread.join(timeout)
    if requests._thread is None or not requests._thread.is_alive():
        requests._writer.close()
