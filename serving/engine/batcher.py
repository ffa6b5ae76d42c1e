"""Dynamic micro-batching: concurrent requests share one model call.

Requests put their texts on a bounded queue and await a future. Each inference thread
(`workers` of them) takes everything that is waiting (up to `max_batch_size` texts),
tokenizes it, groups it by length so that short texts do not pay for long ones'
padding, runs the groups through onnxruntime and resolves each request's future. The
event loop only queues and awaits: tokenization and inference never run on it. A
next-word bundle's /predict is a batched prefill the same way (its top-k next words);
its /generate runs in serving/engine/generation.py's decoding steps instead.

- Idle and alone, a request runs at once: a thread waits `max_wait_ms` for
  companions only while its previous batch had several requests (that is, under load).
- A full queue refuses new work at once (`QueueFull`, answered 503 with Retry-After)
  instead of growing without bound; work that was accepted is always completed.
- Work that cannot share a model call (an explanation) goes through the same queue
  with `submit_call` and runs on its own, so the same bound holds for it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.bundle import Bundle, softmax
from serving.bundle.images import brightness_contrast
from serving.monitoring.metrics import BatchStats


class QueueFull(Exception):
    """The queue holds `max_queue` texts already."""


@dataclass
class Job:
    texts: list[str]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)
    call: Callable[[Bundle], Any] | None = None  # set: run alone, not batched


def length_groups(lengths: list[int], max_padding: float = 1.25) -> list[list[int]]:
    """Indices grouped by length: in each group, padded tokens (longest x count) stay
    within `max_padding` x the real tokens, so no group is mostly padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups, current, real = [], [], 0
    for i in order:
        longest = lengths[i]  # ascending: the newcomer is the longest
        if current and longest * (len(current) + 1) > max_padding * (real + longest):
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += longest
    if current:
        groups.append(current)
    return groups


def infer(bundle: Bundle, texts: list, top_k: int = 20) -> tuple[np.ndarray, BatchStats]:
    """Probabilities for texts, run as length groups; the rows come back in order. An
    image bundle's items (decoded uint8 pixels) run as one batch; a next-word bundle
    gives each text's `top_k` next words instead (`infer_next_words`)."""
    if bundle.task.items == "images":
        return infer_images(bundle, texts)
    if bundle.decoder is not None:
        return infer_next_words(bundle, texts, top_k)
    started = time.perf_counter()
    encoded = bundle.encode(texts)
    lengths = [len(ids) for ids in encoded]
    probs = np.empty((len(texts), len(bundle.label_names)), dtype=np.float32)
    groups = length_groups(lengths)
    padded = 0
    for group in groups:
        probs[group] = softmax(bundle.run([encoded[i] for i in group]))
        padded += max(lengths[i] for i in group) * len(group)
    unk = bundle.unk_id
    stats = BatchStats(texts=len(texts), requests=1, groups=len(groups),
                       real_tokens=sum(lengths), padded_tokens=padded,
                       seconds=time.perf_counter() - started, lengths=lengths,
                       unknown=[ids.count(unk) for ids in encoded],
                       predicted=probs.argmax(axis=1).tolist(), bundle=bundle)
    return probs, stats


def infer_next_words(bundle: Bundle, texts: list[str], k: int
                     ) -> tuple[list[list[tuple[str, float]]], BatchStats]:
    """Each text's k most probable next words and their probabilities: one prefill
    per length group (serving/bundle/decoding.py `Decoder.topk`), rows in order.
    A prompt over the model's context (the route refuses those; a reload to a shorter
    context may still slip one in) keeps its latest tokens."""
    started = time.perf_counter()
    decoder = bundle.decoder
    encoded = decoder.inputs.encode(texts)
    if decoder.max_len is not None:
        encoded = [ids[len(ids) - decoder.max_len + 1:] if len(ids) >= decoder.max_len
                   else ids for ids in encoded]
    lengths = [len(ids) + 1 for ids in encoded]  # the [EOS] each prompt follows
    rows: list = [None] * len(texts)
    surprisal: list = [None] * len(texts)
    groups = length_groups(lengths)
    for group in groups:
        best, measured = decoder.topk_surprisal([encoded[i] for i in group], k)
        for i, top, value in zip(group, best, measured, strict=True):
            rows[i] = [(word, p) for word, (_, p) in
                       zip(decoder.inputs.words([t for t, _ in top]), top, strict=True)]
            surprisal[i] = value
    # drift: the prompts' lengths and unknown words, and how surprising the model
    # found them (there are no classes to compare)
    stats = BatchStats(texts=len(texts), requests=1, groups=len(groups),
                       real_tokens=sum(lengths),
                       padded_tokens=sum(max(lengths[i] for i in g) * len(g) for g in groups),
                       seconds=time.perf_counter() - started,
                       lengths=[len(ids) for ids in encoded],
                       unknown=[ids.count(decoder.unk_id) for ids in encoded],
                       predicted=[], bundle=bundle,
                       features={"surprisal": [v for v in surprisal if v is not None]})
    return rows, stats


class Batcher:
    """Runs jobs on `workers` inference threads, batching what arrives together."""

    def __init__(self, get_bundle: Callable[[], Bundle], max_batch_size: int = 64,
                 max_wait_ms: float = 0.0, max_queue: int = 1024,
                 on_batch: Callable[[BatchStats], None] | None = None, enabled: bool = True,
                 workers: int = 1, on_depth: Callable[[int], None] | None = None,
                 top_k: int = 20):
        self.get_bundle = get_bundle
        self.top_k = top_k  # next words computed per text for a next-word bundle
        self.enabled = enabled  # False: each request runs alone, in a worker thread
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.on_batch = on_batch or (lambda stats: None)
        self.on_depth = on_depth or (lambda depth: None)  # a gauge, told of each change
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.queued_texts = 0  # texts accepted and not yet taken by the thread
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, name=f"inference-{i}", daemon=True)
                        for i in range(workers)]
        for thread in self.threads:
            thread.start()

    @property
    def depth(self) -> int:
        return self.queued_texts

    async def submit(self, texts: list[str]) -> tuple[np.ndarray, Bundle]:
        """Probabilities for `texts` and the bundle that computed them (a reload may
        swap bundles between requests); raises QueueFull when the queue is full."""
        self._admit(len(texts))
        if not self.enabled:
            return await self._alone(texts)
        return await self._enqueue(texts, None)

    async def submit_call(self, call: Callable[[Bundle], Any], texts: list[str]
                          ) -> tuple[Any, Bundle]:
        """`call(bundle)` on an inference thread, alone, and the bundle it ran on; it
        counts as `texts` against the queue bound like a prediction would."""
        self._admit(len(texts))
        if not self.enabled:
            return await self._alone(texts, call)
        return await self._enqueue(texts, call)

    def _admit(self, count: int) -> None:
        with self.lock:
            if self.queued_texts + count > self.max_queue:
                raise QueueFull(f"{self.queued_texts} texts queued (limit {self.max_queue})")
            self.queued_texts += count
            self.on_depth(self.queued_texts)

    async def _enqueue(self, texts: list[str], call: Callable[[Bundle], Any] | None):
        loop = asyncio.get_running_loop()
        job = Job(texts=texts, future=loop.create_future(), loop=loop, call=call)
        self.jobs.put(job)
        return await job.future

    async def _alone(self, texts: list[str], call: Callable[[Bundle], Any] | None = None):
        """Batching off: the work runs in a thread of its own, right away."""
        bundle = self.get_bundle()
        try:
            if call is not None:
                return await asyncio.to_thread(call, bundle), bundle
            probs, stats = await asyncio.to_thread(infer, bundle, texts, self.top_k)
        finally:
            self._taken_texts(len(texts))
        self.on_batch(stats)
        return probs, bundle

    def close(self) -> None:
        """Finish what was accepted, then stop the thread."""
        for _ in self.threads:
            self.jobs.put(None)
        for thread in self.threads:
            thread.join()

    # ------------------------------------------------------------ the inference thread

    def _take(self, first: Job, under_load: bool) -> tuple[list[Job], Job | None, bool]:
        """`first` plus whatever else is waiting, up to max_batch_size texts; also a
        job that must run alone, if one was met (it runs next), and whether to stop."""
        batch, size = [first], len(first.texts)
        deadline = time.perf_counter() + (self.max_wait if under_load else 0.0)
        while size < self.max_batch_size:
            timeout = deadline - time.perf_counter()
            try:
                job = self.jobs.get(timeout=timeout) if timeout > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return batch, None, True
            if job.call is not None:
                return batch, job, False
            batch.append(job)
            size += len(job.texts)
        return batch, None, False

    def _loop(self) -> None:
        under_load, stop, held = False, False, None
        while not stop:
            first, held = held or self.jobs.get(), None
            if first is None:
                break
            if first.call is not None:
                self._taken([first])
                self._run_call(first)
                continue
            batch, held, stop = self._take(first, under_load)
            under_load = len(batch) > 1
            self._taken(batch)
            self._run(batch)

    def _taken(self, jobs: list[Job]) -> None:
        self._taken_texts(sum(len(job.texts) for job in jobs))

    def _taken_texts(self, count: int) -> None:
        with self.lock:
            self.queued_texts -= count
            self.on_depth(self.queued_texts)

    def _run_call(self, job: Job) -> None:
        bundle = self.get_bundle()
        try:
            result = job.call(bundle)
        except Exception as err:  # noqa: BLE001 - the request gets the error
            job.loop.call_soon_threadsafe(_set_exception, job.future, err)
            return
        job.loop.call_soon_threadsafe(_set_result, job.future, (result, bundle))

    def _run(self, batch: list[Job]) -> None:
        texts = [text for job in batch for text in job.texts]
        bundle = self.get_bundle()
        try:
            probs, stats = infer(bundle, texts, self.top_k)
        except Exception as err:  # noqa: BLE001 - every waiting request gets the error
            for job in batch:
                job.loop.call_soon_threadsafe(_set_exception, job.future, err)
            return
        stats.requests = len(batch)
        start = 0
        for job in batch:
            rows = probs[start : start + len(job.texts)]
            start += len(job.texts)
            job.loop.call_soon_threadsafe(_set_result, job.future, (rows, bundle))
        self.on_batch(stats)


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():  # the request may have timed out and gone
        future.set_result(value)


def _set_exception(future: asyncio.Future, err: Exception) -> None:
    if not future.done():
        future.set_exception(err)


def infer_images(bundle: Bundle, images: list[np.ndarray]) -> tuple[np.ndarray, BatchStats]:
    """Probabilities for decoded images (uint8 at the spec's size), one model call."""
    started = time.perf_counter()
    probs = softmax(bundle.run(bundle.encode(images)))
    brightness, contrast = brightness_contrast(np.stack(images))
    stats = BatchStats(texts=len(images), requests=1, groups=1, real_tokens=0,
                       padded_tokens=0, seconds=time.perf_counter() - started, lengths=[],
                       unknown=[], predicted=probs.argmax(axis=1).tolist(), bundle=bundle,
                       features={"brightness": brightness.tolist(),
                                 "contrast": contrast.tolist()})
    return probs, stats
