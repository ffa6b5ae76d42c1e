"""The model being served and the work on it: loading, reloading, predicting.

`InferenceService` holds what the routes share: the settings, the bundle (swapped in
with one assignment, so requests in flight finish on the old one), the batcher that
every prediction and explanation goes through, the metrics and the prediction log. A
bundle that fails to load or to warm up is refused and the old one keeps serving.
With several server processes, each holds an `InferenceService` of its own and they
follow one another's reloads through serving/processes/workers.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import numpy as np

from serving.engine.batcher import Batcher, QueueFull
from serving.bundle import Bundle, BundleError
from serving.api.errors import ApiError
from serving.engine.explain import explain
from serving.monitoring.metrics import ServiceMetrics
from serving.predlog.log import LogBehind, PredictionLog
from serving.settings import Settings
from serving.engine.source import BundleSource
from serving.processes.workers import SYNC_INTERVAL_S, WorkerGroup

log = logging.getLogger("serving")

WARM_UP_TEXTS = ["warm up", "a somewhat longer sentence to warm up the model with " * 4]
MEMORY_INTERVAL_S = 5.0

T = TypeVar("T")


def load_warm(path: Path, settings: Settings, workers: int = 1) -> Bundle:
    """Load a bundle and run it once, as one of `workers` server processes;
    BundleError if it cannot serve."""
    bundle = Bundle.load(path, settings.precision, settings.runtime_options(workers))
    try:
        bundle.predict_proba(WARM_UP_TEXTS)
    except Exception as err:  # noqa: BLE001 - a bundle that cannot predict is broken
        raise BundleError(f"{path}: the model fails on warm-up texts ({err})") from err
    return bundle


class InferenceService:
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
        self.reload_lock = asyncio.Lock()
        self.watcher: asyncio.Task | None = None
        self.coordinator: asyncio.Task | None = None
        self.beater: asyncio.Task | None = None
        self.prediction_log = (PredictionLog.from_settings(settings, self.metrics)
                               if settings.prediction_log else None)
        if self.prediction_log and self.group:
            self.prediction_log.siblings = True

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        s = self.settings
        if self.group:  # from the first moment: loading a bundle may take minutes
            self.beater = asyncio.create_task(self.beat())
        self.batcher = Batcher(lambda: self.bundle, s.max_batch_size, s.max_wait_ms,
                               s.max_queue, on_batch=self.metrics.observe_batch,
                               enabled=s.batching, workers=s.inference_threads,
                               on_depth=self.metrics.queue_depth.set)
        self.metrics.note_memory()
        if self.prediction_log:  # it connects in its own thread: a slow database never
            self.prediction_log.start()  # delays readiness
        try:
            await self.reload()
        except BundleError as err:
            self.error = str(err)
            log.error("cannot serve yet: %s", err)
            self._report(error=self.error)
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
        if self.batcher:
            await asyncio.to_thread(self.batcher.close)
        if self.prediction_log:
            await asyncio.to_thread(self.prediction_log.close)

    # ------------------------------------------------------------ the model's work

    def require_bundle(self) -> Bundle:
        """The bundle being served; 503 `not_ready` (saying why) while there is none."""
        if self.bundle is None:
            raise ApiError(503, "not_ready", self.error or "the model is still loading")
        return self.bundle

    async def predict(self, texts: list[str]) -> tuple[np.ndarray, Bundle]:
        """Probabilities and the bundle that computed them."""
        self.require_bundle()
        return await self._bounded(self.batcher.submit(texts))

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

    async def explain(self, text: str) -> tuple[dict, Bundle]:
        """Token attributions for `text` (serving/engine/explain.py) and the bundle used.
        Queued like a prediction, so the same queue bound and timeout hold."""
        self.require_bundle()
        return await self._bounded(
            self.batcher.submit_call(lambda bundle: explain(bundle, text), [text]))

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
            self.metrics.rejected.labels("timeout").inc()
            raise ApiError(504, "timeout", "no answer within "
                           f"{self.settings.request_timeout_s} s") from None

    # ------------------------------------------------------------ following the bundle

    async def reload(self, spec: str | None = None) -> dict:
        """Load, warm and swap in the bundle behind `spec` (default: the followed one)."""
        async with self.reload_lock:
            return await self._reload(spec)

    async def _reload(self, spec: str | None) -> dict:
        """`reload`'s work; the caller holds `reload_lock`."""
        source = BundleSource(spec, self.settings.cache_dir) if spec else self.source
        try:
            identity = await asyncio.to_thread(source.identity)
            path = await asyncio.to_thread(source.fetch, identity)
            bundle = await asyncio.to_thread(load_warm, path, self.settings,
                                             self.workers)
        except BundleError:
            self.metrics.reloads.labels("refused").inc()
            raise
        except Exception as err:  # registry or file system: the bundle is not there
            self.metrics.reloads.labels("refused").inc()
            raise BundleError(f"{source.spec}: cannot fetch the bundle ({err})") from err
        previous = self.bundle
        # metrics first: drift then drops the old bundle's late batches, never new ones
        self.metrics.set_model(bundle)
        self.bundle, self.identity, self.error = bundle, identity, None
        if self.prediction_log:  # live accuracy follows the model being served
            self.prediction_log.served_version = bundle.version
        self.source = source  # follow what was loaded from now on
        self.metrics.reloads.labels("ok").inc()
        self._report()
        log.info("serving bundle %s from %s", bundle.version, path)
        return {"model_version": bundle.version,
                "previous_version": previous.version if previous else None}

    async def reload_everywhere(self, spec: str | None = None) -> dict:
        """`reload` here, then in every other worker; the answer lists what each
        worker serves once it has followed. 503 `reload_incomplete`, naming them, if
        a worker refused the bundle or did not follow in time."""
        async with self.reload_lock:  # a sibling's older reload cannot slip in between
            result = await self._reload(spec)
            if self.group is None:
                result["workers"] = [{"pid": os.getpid(), "model_version":
                                      result["model_version"], "error": None,
                                      "followed": True}]
                return result
            generation = self.group.announce_reload(self.source.spec)
            self._report(generation=generation)
        workers = await asyncio.to_thread(self.group.wait_for, generation,
                                          self.settings.request_timeout_s * 3)
        result["workers"] = [
            {"pid": pid, "model_version": state["model_version"], "error": state["error"],
             "followed": state["generation"] >= generation and not state["error"]}
            for pid, state in sorted(workers.items())]
        behind = [w for w in result["workers"] if not w["followed"]]
        if behind:
            raise ApiError(503, "reload_incomplete", f"{len(behind)} of "
                           f"{len(result['workers'])} server processes do not serve "
                           f"{result['model_version']}: " + "; ".join(
                               f"pid {w['pid']}: {w['error'] or 'did not follow in time'}"
                               for w in behind), workers=result["workers"])
        return result

    def every_worker(self) -> list[dict]:
        """What each server process serves: after a reload or a registry alias moves,
        the workers switch one by one, and this says when all of them have."""
        if self.group is None:
            return [{"pid": os.getpid(), "model_version": getattr(self.bundle, "version",
                                                                  None),
                     "identity": self.identity}]
        return [{"pid": pid, "model_version": state["model_version"],
                 "identity": state["identity"]}
                for pid, state in sorted(self.group.workers().items())]

    def _report(self, error: str | None = None, generation: int | None = None) -> None:
        if self.group:
            self.group.report(getattr(self.bundle, "version", None), self.identity,
                              error, generation)

    async def coordinate(self) -> None:
        """With several workers: follow reloads that another worker received, and
        publish this worker's drift window and memory for the others' scrapes."""
        published, memory_at, labels_seen = None, 0.0, 0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            try:  # one failed pass (a full /tmp, say) must not end the worker's syncing
                if self.group.pending_reload():
                    await self.follow_reload()
                if self.prediction_log and \
                        (mark := self.group.feedback_since(labels_seen)) > labels_seen:
                    labels_seen = mark
                    self.prediction_log.refresh_stats()
                now = loop.time()
                if self.metrics.drift.observed != published:
                    published = self.metrics.drift.observed
                    self.group.publish_drift(self.metrics.drift.summary())
                if now - memory_at >= MEMORY_INTERVAL_S:
                    memory_at = now
                    self.metrics.note_memory()
            except Exception:  # noqa: BLE001 - logged, and the next pass tries again
                log.exception("syncing with the other server processes failed")

    async def beat(self) -> None:
        """Tell the supervisor, every SYNC_INTERVAL_S, that this worker's event loop
        runs: one that stops beating is killed and replaced (serving/processes/supervisor.py)."""
        while True:
            try:
                self.group.beat()
            except OSError as err:
                log.warning("cannot write the heartbeat: %s", err)
            await asyncio.sleep(SYNC_INTERVAL_S)

    async def follow_reload(self) -> None:
        """Serve the bundle another worker's admin reload asked for. Checked again
        under the lock: a newer reload received here meanwhile must win."""
        async with self.reload_lock:
            if not (pending := self.group.pending_reload()):
                return
            generation, spec = pending
            try:
                await self._reload(spec)
            except BundleError as err:
                log.error("refused %s, which another worker loaded: %s", spec, err)
                self._report(error=str(err), generation=generation)
            else:
                self._report(generation=generation)

    async def watch(self) -> None:
        """Follow the bundle spec: reload when the link or the registry alias moves."""
        while True:
            await asyncio.sleep(self.settings.watch_interval_s)
            try:
                identity = await asyncio.to_thread(self.source.identity)
            except Exception as err:  # noqa: BLE001 - e.g. the tracking server is down
                log.warning("cannot check %s: %s", self.source.spec, err)
                continue
            if identity in (self.identity, self.refused_identity):
                continue
            try:
                await self.reload()
            except BundleError as err:
                self.refused_identity = identity
                log.error("refused %s, still serving the old bundle: %s", identity, err)
