"""Scoring chunks of texts in a pool of processes, the results back in input order.

Each worker process loads the bundle once, with one onnxruntime thread, so that N
processes use N cores without fighting over them (as the service's workers do), and
scores a chunk exactly as the service scores a batch: `infer` from
serving/engine/inference.py (the same tokenizer, truncation, length grouping and model).
With one worker the chunks are scored in the calling process: no process to start.
What a chunk is scored with is the scorer's `work` (`score` for texts;
serving/batch/images.py's `score_files` reads and decodes image files in the worker).

`ordered_map` keeps at most `max_in_flight` chunks submitted and not yet handed back,
so however large the input, only that many chunks (and their rows) are held at once.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

import numpy as np

from serving.batch.readers import BatchError
from serving.bundle import Bundle, BundleError, RuntimeOptions
from serving.engine.inference import infer

T = TypeVar("T")

_bundle: Bundle | None = None  # this worker process's bundle
_load_error: str | None = None


def load_bundle(bundle_dir: str, precision: str) -> None:
    """A worker's initializer. A failure is kept and raised by the first chunk, whose
    error then says why (an initializer's own exception only breaks the pool)."""
    global _bundle, _load_error
    try:
        _bundle = Bundle.load(bundle_dir, precision, RuntimeOptions(intra_op_threads=1))
    except BundleError as err:
        _load_error = str(err)


def start_worker(bundle_dir: str, precision: str) -> None:
    """A worker process's initializer: one core for the tokenizer too. Its batch
    encoding otherwise runs on a thread per core in every worker process (measured with
    2 workers on 2 cores and the smoke model: about twice the texts/s with one each)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load_bundle(bundle_dir, precision)


def worker_bundle() -> Bundle:
    """This process's bundle, or BundleError saying why it could not be loaded."""
    if _bundle is None:
        raise BundleError(_load_error or "the worker has no bundle")
    return _bundle


def score(texts: list[str]) -> np.ndarray:
    """Class probabilities [texts, classes], float32, as the service computes them."""
    probs, _ = infer(worker_bundle(), texts)
    return probs


class InlineScorer:
    """One worker: scores in this process, each chunk when it is submitted."""

    def __init__(self, bundle_dir: str, precision: str, work: Callable[[list], object]):
        load_bundle(bundle_dir, precision)
        self.work = work

    def submit(self, items: list) -> Future:
        future: Future = Future()
        try:
            future.set_result(self.work(items))
        except Exception as err:  # noqa: BLE001 - handed to whoever reads the result
            future.set_exception(err)
        return future

    def close(self, cancel: bool = False) -> None:
        global _bundle
        _bundle = None


class ProcessScorer:
    """`workers` processes, started fresh (spawn): a fork would copy whatever threads
    and locks the caller holds."""

    def __init__(self, bundle_dir: str, precision: str, workers: int,
                 work: Callable[[list], object]):
        self.work = work  # a module-level function: the workers import it by name
        self.executor = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=start_worker, initargs=(bundle_dir, precision))

    def submit(self, items: list) -> Future:
        return self.executor.submit(self.work, items)

    def close(self, cancel: bool = False) -> None:
        self.executor.shutdown(wait=True, cancel_futures=cancel)


def scorer(bundle_dir: str, precision: str, workers: int,
           work: Callable[[list], object] | None = None) -> InlineScorer | ProcessScorer:
    """Chunks scored by `work` (default: `score`, texts) in `workers` processes."""
    work = work or score  # looked up now, not at import: a test may stand in for it
    if workers == 1:
        return InlineScorer(bundle_dir, precision, work)
    return ProcessScorer(bundle_dir, precision, workers, work)


def ordered_map(submit: Callable[[T], Future], items: Iterable[T],
                max_in_flight: int) -> Iterator[tuple[T, object]]:
    """(item, result) for each item, in input order, with at most `max_in_flight` items
    taken from `items` and not yet yielded: the input is read only as fast as results
    are consumed."""
    pending: deque[tuple[T, Future]] = deque()
    items = iter(items)
    exhausted = False
    while True:
        while not exhausted and len(pending) < max_in_flight:
            item = next(items, _END)
            if item is _END:
                exhausted = True
            else:
                pending.append((item, submit(item)))
        if not pending:
            return
        item, future = pending.popleft()
        try:
            result = future.result()
        except BrokenProcessPool:
            # workers start fresh and import the caller's main module: a script that
            # calls predict_file outside `if __name__ == "__main__":` breaks them
            raise BatchError("a worker process died (out of memory? or a script calling "
                             "predict_file outside `if __name__ == '__main__':`); nothing "
                             "was written") from None
        yield item, result


_END = object()
