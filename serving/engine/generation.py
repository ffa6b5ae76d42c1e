"""Continuous batching for a next-word model: every generation in flight advances in
one model call per step, and a request that arrives meanwhile joins at the next step
instead of waiting for the others to finish.

`Generator` owns one decoding thread. At each step it
1. admits waiting generations while fewer than `max_running` run (a newcomer's prompt
   is fed in the same call as the others' last tokens: `Decoder.step` takes sequences
   in any state, serving/bundle/decoding.py);
2. calls `decoder.advance` once for the running sequences of each bundle: normally
   one bundle; after a reload, sequences started on the old one finish on it (in a
   call of their own) while new requests start on the new one;
3. hands every generation its new token through its own asyncio queue, with one
   `loop.call_soon_threadsafe` per step for all of them, so a route can answer when
   its sequence ends or stream each token as it comes;
4. drops generations that finished, failed, or were cancelled (the client left or
   its request timed out).

The onnxruntime call releases the GIL, so the event loop answers other requests while
the model runs. Bounds: `max_running` sequences per step, `max_queue` waiting for a
place (`QueueFull` beyond, answered 503 with Retry-After); `close` lets what was
admitted finish, then cancels what is left after its timeout, so a shutdown never
hangs on a generation.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from serving.bundle import Bundle
from serving.bundle.decoding import Sequence
from serving.engine.batcher import QueueFull
from serving.monitoring.metrics import ServiceMetrics

log = logging.getLogger("serving")


class Closed(Exception):
    """The generator is shutting down: no new generations, and those left were cut."""


@dataclass(frozen=True)
class Update:
    """One step of one generation, as the route sees it: the new token's word (None
    when the step ended the sequence on [EOS]), the continuation's text that may be
    shown so far, and why it ended, once it has."""

    token: str | None
    text: str
    finish_reason: str | None


class Generation:
    """One request's generation: its sequence, the bundle whose decoder runs it to the
    end, and the queue its updates arrive on, in the request's event loop."""

    def __init__(self, bundle: Bundle, seq: Sequence):
        self.bundle, self.decoder, self.seq = bundle, bundle.decoder, seq
        self.loop = asyncio.get_running_loop()
        self.updates: asyncio.Queue[Update | Exception] = asyncio.Queue()
        self.admitted = time.perf_counter()
        self.last_token_at: float | None = None
        # set on the event loop, read by the decoding thread at its next step: a flag
        # is enough, the thread only drops the sequence
        self.cancelled = False
        self.failed = False  # decoding thread only

    def cancel(self) -> None:
        """The requester is gone: leave the decoding steps (a no-op once finished)."""
        self.cancelled = True

    async def stream(self, deadline: float) -> AsyncIterator[Update]:
        """Each update until the sequence finishes; TimeoutError once the event loop's
        clock passes `deadline` (the generation is cancelled then), the decoding
        thread's error if it failed."""
        try:
            while True:
                async with asyncio.timeout_at(deadline):
                    item = await self.updates.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.cancel()

    async def result(self, deadline: float) -> Sequence:
        """The finished sequence (see `stream` for the errors)."""
        async for _ in self.stream(deadline):
            pass
        return self.seq


class Generator:
    """The decoding thread and its bounds (see the module docstring)."""

    def __init__(self, max_running: int, max_queue: int,
                 metrics: ServiceMetrics | None = None):
        self.max_running, self.max_queue = max_running, max_queue
        self.metrics = metrics
        self.cond = threading.Condition()
        self.waiting: deque[Generation] = deque()  # guarded by cond
        self.running: list[Generation] = []  # the decoding thread's own
        self.closing = self.aborting = False
        self.thread = threading.Thread(target=self._loop, name="decoding", daemon=True)
        self.thread.start()

    def submit(self, bundle: Bundle, seq: Sequence) -> Generation:
        """Queue `seq` (started by `bundle.decoder`) to be decoded from the next step
        on; QueueFull when `max_queue` generations wait already, Closed while shutting
        down. On the event loop."""
        generation = Generation(bundle, seq)
        with self.cond:
            if self.closing:
                raise Closed("the service is shutting down")
            # a waiting generation whose requester left or timed out holds no place
            if any(g.cancelled for g in self.waiting):
                self.waiting = deque(g for g in self.waiting if not g.cancelled)
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} generations waiting "
                                f"(limit {self.max_queue})")
            self.waiting.append(generation)
            self._gauges()
            self.cond.notify()
        return generation

    def close(self, timeout: float) -> None:
        """Admit nothing new; let the admitted generations finish for up to `timeout`
        seconds, then cut the rest (each gets `Closed`) and stop the thread."""
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join(timeout)
        if self.thread.is_alive():
            with self.cond:
                self.aborting = True
                self.cond.notify()
            self.thread.join(10)

    # ------------------------------------------------------------ the decoding thread

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not (self.waiting or self.running or self.closing):
                    self.cond.wait()
                if self.aborting:
                    cut, self.running = [*self.running, *self.waiting], []
                    self.waiting.clear()
                    self._gauges()
                    self._deliver([(g, Closed("the service stopped before this generation "
                                              "finished")) for g in cut])
                    return
                while self.waiting and len(self.running) < self.max_running:
                    generation = self.waiting.popleft()
                    if not generation.cancelled:  # its client left while it waited
                        self.running.append(generation)
                self._gauges()
                if not self.running:
                    if self.closing and not self.waiting:
                        return
                    continue
            self._step()

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.running.set(len(self.running))
            self.metrics.waiting.set(len(self.waiting))

    def _step(self) -> None:
        """One decoding step: one model call per bundle over its running sequences."""
        live = [g for g in self.running if not g.cancelled]
        by_decoder: dict[int, list[Generation]] = {}
        for generation in live:
            by_decoder.setdefault(id(generation.decoder), []).append(generation)
        deliveries: list[tuple[Generation, Update | Exception]] = []
        for group in by_decoder.values():
            deliveries += self._advance(group)
        self.running = [g for g in live if not (g.seq.finished or g.failed)]
        self._gauges()
        self._deliver(deliveries)

    def _advance(self, group: list[Generation]) -> list[tuple[Generation, Update | Exception]]:
        decoder = group[0].decoder
        try:
            tokens = decoder.advance([g.seq for g in group])
        except Exception as err:  # noqa: BLE001 - each of these requests gets the error
            log.exception("a decoding step of %d sequences failed", len(group))
            for generation in group:
                generation.failed = True
            return [(g, err) for g in group]
        now = time.perf_counter()
        words = iter(decoder.inputs.words([t for t in tokens if t is not None]))
        updates, produced = [], 0
        for generation, token in zip(group, tokens, strict=True):
            if token is not None:
                produced += 1
                if self.metrics:
                    if generation.last_token_at is None:
                        self.metrics.first_token.observe(now - generation.admitted)
                    else:
                        self.metrics.inter_token.observe(now - generation.last_token_at)
                generation.last_token_at = now
            seq = generation.seq
            updates.append((generation, Update(next(words) if token is not None else None,
                                               seq.visible_text(), seq.finish_reason)))
        if self.metrics:
            self.metrics.generated.inc(produced)
            self.metrics.step_sequences.observe(len(group))
            for generation in group:
                if generation.seq.surprisal is not None:  # its prompt went in this step
                    self._observe_prompt(generation)
        return updates

    def _observe_prompt(self, generation: Generation) -> None:
        """A prompt into the drift window, as /predict's are (serving/engine/batcher.py):
        its length, unknown words and surprisal, measured while it was fed."""
        seq, decoder = generation.seq, generation.decoder
        prompt = seq.ids[1:len(seq.ids) - len(seq.generated)]  # after the leading [EOS]
        measured = seq.surprisal
        seq.surprisal = None  # the continuation's own tokens are not the prompt's
        self.metrics.drift.observe(
            generation.bundle, [len(prompt)], [prompt.count(decoder.unk_id)], [],
            {"surprisal": [float(sum(measured) / len(measured))] if measured else []})

    @staticmethod
    def _deliver(deliveries: list[tuple[Generation, Update | Exception]]) -> None:
        """Each generation's update onto its queue: one wake-up per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for generation, item in deliveries:
            by_loop.setdefault(generation.loop, []).append((generation.updates, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop has closed: nobody is waiting
                pass


def _put_all(items: list[tuple[asyncio.Queue, Update | Exception]]) -> None:
    for updates, item in items:
        updates.put_nowait(item)
