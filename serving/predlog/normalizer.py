"""Normalising the logged texts off the service's GIL, in a child process.

The log stores each text as training saw it: through the bundle's own tokenizer
normalizer. This module holds that normalisation and the one-process pool that runs
it for the writer (serving/predlog/writer.py). It imports nothing of the service, so
the spawned child imports only this module to unpickle `normalize_texts`.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.bundle import Bundle

# The bundle's normalizer is a chain of some twenty regular-expression rules: about
# 40 us per SST-2 sentence, all of it holding the GIL, which the service's event loop
# needs. The writer has it done in a process of its own instead (Normalizer objects
# pickle as their JSON), so the service pays only for sending the texts across.
_NORMALIZERS: dict[bytes, object] = {}


def normalizer_state(bundle: Bundle) -> bytes | None:
    tokenizer = getattr(bundle, "tokenizer", None)  # none: images are logged as hashes
    normalizer = tokenizer.normalizer if tokenizer is not None else None
    return None if normalizer is None else pickle.dumps(normalizer)


def normalize_texts(state: bytes | None, texts: list[str]) -> list[str]:
    """`texts` through a pickled normalizer (unpickled once per process)."""
    if state is None:
        return list(texts)
    normalizer = _NORMALIZERS.get(state)
    if normalizer is None:
        normalizer = _NORMALIZERS[state] = pickle.loads(state)  # noqa: S301 - our own
    return [normalizer.normalize_str(text) for text in texts]


def _exit_with_parent(parent: int) -> None:
    """In the child: exit once the service is gone, however it went (a SIGKILL, or
    uvicorn re-raising SIGTERM, leaves it no time to stop its children)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


class Normalizing:
    """Normalises the texts of a batch of entries in a child process."""

    def __init__(self):
        self.pool: ProcessPoolExecutor | None = None
        self.states: dict[str, bytes | None] = {}  # by bundle version

    def __call__(self, entries: list[tuple]) -> list[list[str]]:
        """The normalised texts of each (request_id, created, bundle, texts, probs)."""
        by_bundle: dict[int, list[int]] = {}
        for i, entry in enumerate(entries):
            by_bundle.setdefault(id(entry[2]), []).append(i)
        normalized: list[list[str]] = [[] for _ in entries]
        for indices in by_bundle.values():
            bundle = entries[indices[0]][2]
            texts = [text for i in indices for text in entries[i][3]]
            done = iter(self._run(self._state(bundle), texts))
            for i in indices:
                normalized[i] = [next(done) for _ in entries[i][3]]
        return normalized

    def _state(self, bundle: Bundle) -> bytes | None:
        if bundle.version not in self.states:
            self.states[bundle.version] = normalizer_state(bundle)
        return self.states[bundle.version]

    def _run(self, state: bytes | None, texts: list[str]) -> list[str]:
        if self.pool is None:
            # spawn, not fork: the service's threads (uvicorn, onnxruntime) must not be
            # copied mid-work into the child
            self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_exit_with_parent,
                                            initargs=(os.getpid(),))
        try:
            return self.pool.submit(normalize_texts, state, texts).result(timeout=60)
        except Exception:
            self.close(wait=False)  # a broken or stuck child: the next batch starts anew
            raise

    def close(self, wait: bool = True) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=wait, cancel_futures=True)
            self.pool = None
