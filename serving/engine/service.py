"""The model being served and the work on it: predicting, explaining, labels.

`InferenceService` holds what the routes share: the settings, the bundle (swapped in
with one assignment, so requests in flight finish on the old one), the batcher that
every prediction and explanation goes through, the generator whose decoding steps run
a next-word model's generations (serving/engine/generation.py), the metrics and the
prediction log.
Loading and reloading the bundle, and following the other server processes, are its
`BundleFollowing` half (serving/engine/following.py): a bundle that fails to load or
to warm up is refused and the old one keeps serving. With several server processes,
each holds an `InferenceService` of its own and they follow one another's reloads
through serving/processes/workers.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TypeVar

import numpy as np

from serving.bundle import Bundle, BundleError
from serving.bundle.sampling import Sampling
from serving.engine.batcher import Answered, Batcher, QueueFull
from serving.engine.challenger import Challenging
from serving.engine.explain import explain_item, grid
from serving.engine.following import BundleFollowing
from serving.engine.generation import Closed, Generation, Generator
from serving.engine.source import BundleSource
from serving.errors import ApiError
from serving.monitoring.metrics import ServiceMetrics
from serving.predlog.feedback import LogBehind
from serving.predlog.writer import PredictionLog
from serving.processes.workers import WorkerGroup
from serving.settings import Settings

log = logging.getLogger("serving")

T = TypeVar("T")


class InferenceService(BundleFollowing, Challenging):
    """Settings, the bundle and where it came from, the batcher, the metrics."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.group = WorkerGroup.from_env()  # None: this process serves alone
        self.workers = settings.worker_count() if self.group else 1
        # Each worker keeps its share of the drift window; a scrape adds them up.
        window = max(settings.drift_window // self.workers, 1)
        self.metrics = ServiceMetrics(window, self.group)
        # A replacement worker serves what the latest admin reload asked for.
        spec = (self.group.generation()[1] if self.group else None) or settings.bundle
        self.source = BundleSource(spec, settings.cache_dir)
        self.bundle: Bundle | None = None
        self.identity: str | None = None  # of the bundle served, as the source names it
        self.error: str | None = None  # why no bundle serves, if one failed to load
        self.refused_identity: str | None = None  # not retried until the source moves
        self.batcher: Batcher | None = None
        self.generator: Generator | None = None
        self.reload_lock = asyncio.Lock()
        self.watcher: asyncio.Task | None = None
        self.coordinator: asyncio.Task | None = None
        self.beater: asyncio.Task | None = None
        self.prediction_log = (PredictionLog.from_settings(settings, self.metrics)
                               if settings.prediction_log else None)
        if self.prediction_log and self.group:
            self.prediction_log.siblings = True
        self.init_challenger()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        s = self.settings
        if self.group:  # from the first moment: loading a bundle may take minutes
            self.beater = asyncio.create_task(self.beat())
        self.batcher = Batcher(lambda: self.bundle, s.max_batch_size, s.max_wait_ms,
                               s.max_queue, on_batch=self.metrics.observe_batch,
                               enabled=s.batching, workers=s.inference_threads,
                               on_depth=self.metrics.queue_depth.set,
                               top_k=s.max_next_words)
        self.generator = Generator(s.max_batch_size, s.max_queue, self.metrics)
        self.metrics.note_memory()
        if self.prediction_log:  # it connects in its own thread: a slow database never
            self.prediction_log.start()  # delays readiness
        try:
            await self.reload()
        except BundleError as err:
            self.error = str(err)
            log.error("cannot serve yet: %s", err)
            self._report(error=self.error)
        if s.challenger:
            await self.refresh_challenger()
        self.refresh_evidence()
        if s.watch_interval_s > 0:
            self.watcher = asyncio.create_task(self.watch())
        if self.group:
            self.coordinator = asyncio.create_task(self.coordinate())

    async def stop(self) -> None:
        for task in (self.watcher, self.coordinator, self.beater):
            if task:
                task.cancel()
        if self.group:
            self.group.leave()
        if self.generator:  # generations still running finish, or are cut after the timeout
            await asyncio.to_thread(self.generator.close, self.settings.request_timeout_s)
        if self.batcher:
            await asyncio.to_thread(self.batcher.close)
        await self.stop_challenger(None)
        await self.close_canary_stops()
        if self.prediction_log:
            await asyncio.to_thread(self.prediction_log.close)

    # ------------------------------------------------------------ the model's work

    def require_bundle(self) -> Bundle:
        """The bundle being served; 503 `not_ready` (saying why) while there is none."""
        if self.bundle is None:
            raise ApiError(503, "not_ready", self.error or "the model is still loading")
        return self.bundle

    def workers_starting(self) -> tuple[int, list[str]]:
        """Server processes still without their first bundle, and why those that
        failed to load it failed ((0, []) serving alone): the service is not ready until
        every one serves, or the first requests would all land on the worker that
        happened to load first."""
        return self.group.starting(self.workers) if self.group else (0, [])

    async def predict(self, texts: list[str], key: str | None = None) -> Answered:
        """The answers (serving/engine/batcher.py `Answered`): in canary mode the
        challenger's for the share of keys it takes (`key`: the client's, else the
        request id; serving/engine/challenger.py), the champion's otherwise."""
        self.require_bundle()
        if (answered := await self.canary_answer(texts, key)) is not None:
            return answered
        started = time.perf_counter()
        answered = await self._bounded(self.batcher.submit(texts))
        self.champion_answered(time.perf_counter() - started)
        return answered

    def require_next_word(self, route: str) -> Bundle:
        """The bundle being served, if it is a next-word model; 404 naming the task
        served otherwise."""
        bundle = self.require_bundle()
        if bundle.decoder is None:
            raise ApiError(404, "not_a_language_model", f"POST {route} needs a next-word "
                           f"model; this service serves a {bundle.task.name} model "
                           f"({bundle.version})", task=bundle.task.name)
        return bundle

    def generate(self, bundle: Bundle, prompt: list[int], sampling: Sampling) -> Generation:
        """Start decoding `prompt`'s word ids on `bundle` (its decoder, to the end);
        422 naming `prompt` when it does not fit the model's context, 503 when the
        waiting generations fill the queue or the service is stopping."""
        try:
            seq = bundle.decoder.start(prompt, sampling)
            seq.surprisal = []  # measured while the prompt is fed: the drift window's
        except ValueError as err:
            raise ApiError(422, "prompt_too_long", f"prompt: {err}", field="prompt",
                           limit="max_len", value=bundle.decoder.max_len) from None
        try:
            return self.generator.submit(bundle, seq)
        except QueueFull as err:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(503, "overloaded", f"the service is at capacity: {err}",
                           headers={"Retry-After": "1"}) from None
        except Closed as err:
            raise ApiError(503, "shutting_down", str(err),
                           headers={"Retry-After": "1"}) from None

    def log_prediction(self, request_id: str, bundle: Bundle, texts: list[str],
                       probs: np.ndarray) -> None:
        """Queue an answer for the prediction log (when it is on); never blocks."""
        if self.prediction_log:
            self.prediction_log.record(request_id, bundle, texts, probs)

    async def feedback(self, items: list[tuple[str, int, str]]) -> int:
        """Store labels (request_id, position, label), all or none: 404 naming a pair
        with no logged prediction, 503 while the log's database fails."""
        if not self.prediction_log:
            raise ApiError(404, "disabled", "the prediction log is off (set "
                           "TEXTOPS_PREDICTION_LOG), so there is nothing to label")
        try:
            missing = await asyncio.to_thread(self.prediction_log.feedback, items)
        except LogBehind as err:
            raise ApiError(503, "not_logged_yet", f"{err}; try again shortly",
                           headers={"Retry-After": "1"}) from None
        except Exception as err:  # noqa: BLE001 - the database, not the request, failed
            raise ApiError(503, "log_unavailable", "the prediction log cannot be written "
                           f"now ({type(err).__name__}); try again later",
                           headers={"Retry-After": "5"}) from None
        if missing:
            request_id, position = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ApiError(404, "unknown_prediction",
                           f"no logged prediction for request_id {request_id!r} position "
                           f"{position}{more}: never answered, not sampled, or past "
                           "retention", request_id=request_id, position=position)
        self.metrics.feedback.inc(len(items))
        if self.group:
            self.group.note_feedback()
        return len(items)

    async def explain(self, item: str | np.ndarray, cell_size: int | None = None
                      ) -> tuple[dict, Bundle]:
        """Token attributions for a text, or a saliency grid of `cell_size` cells for an
        image's uint8 pixels (serving/engine/explain.py), and the bundle used. Queued
        like a prediction, so the same queue bound and timeout hold."""
        bundle = self.require_bundle()
        if not isinstance(item, str):
            try:  # refused here, not on the inference thread, for a clear 422
                grid(bundle.inputs.spec, cell_size)
            except ValueError as err:
                raise ApiError(422, "invalid_request", f"cell_size: {err}",
                               field="cell_size") from None
        return await self._bounded(self.batcher.submit_call(
            lambda used: explain_item(used, item, cell_size), [item]))

    async def _bounded(self, work: Awaitable[T]) -> T:
        """`work` within the request timeout; 503 when the queue is full, 504 late."""
        try:
            # a timeout scope, not wait_for: that wraps every request in a task of its own
            async with asyncio.timeout(self.settings.request_timeout_s):
                return await work
        except QueueFull as err:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(503, "overloaded", f"the service is at capacity: {err}",
                           headers={"Retry-After": "1"}) from None
        except TimeoutError:
            raise self.timed_out() from None

    def timed_out(self) -> ApiError:
        """504 `timeout` for a request past the request timeout, counted."""
        self.metrics.rejected.labels("timeout").inc()
        return ApiError(504, "timeout", f"no answer within {self.settings.request_timeout_s} s")
