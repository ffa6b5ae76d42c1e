"""Dynamic micro-batching: concurrent requests share one model call.

Requests put their texts on a bounded queue and await a future. Each inference thread
(`workers` of them) takes everything that is waiting (up to `max_batch_size` texts),
runs it through onnxruntime (serving/engine/inference.py: texts tokenized and grouped by
length, so that short texts do not pay for long ones' padding) and resolves each
request's future with its rows of the answers (`Answered`). The
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
from typing import Any, NamedTuple

import numpy as np

from serving.bundle import Bundle
from serving.engine.inference import infer
from serving.monitoring.metrics import BatchStats


class QueueFull(Exception):
    """The queue holds `max_queue` texts already."""


class Answered(NamedTuple):
    """A request's answers and the bundle that computed them (a reload may swap
    bundles between requests)."""

    probs: np.ndarray | list  # a classifier's probabilities; a next-word model's top words
    bundle: Bundle
    # a text classifier's token ids, as the bundle's tokenizer made them: a shadow
    # challenger with the same tokenizer.json scores them without tokenizing again
    encoded: list[list[int]] | None = None


@dataclass
class Job:
    texts: list[str]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)
    call: Callable[[Bundle], Any] | None = None  # set: run alone, not batched


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

    async def submit(self, texts: list[str]) -> Answered:
        """The answers to `texts`; raises QueueFull when the queue is full."""
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
        return Answered(probs, bundle, stats.encoded)

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
            end = start + len(job.texts)
            answered = Answered(probs[start:end], bundle,
                                None if stats.encoded is None else stats.encoded[start:end])
            start = end
            job.loop.call_soon_threadsafe(_set_result, job.future, answered)
        self.on_batch(stats)


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():  # the request may have timed out and gone
        future.set_result(value)


def _set_exception(future: asyncio.Future, err: Exception) -> None:
    if not future.done():
        future.set_exception(err)
