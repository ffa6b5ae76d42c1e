"""Which bundle each server process serves: loading, reloading, following the source.

`BundleFollowing` is the half of `InferenceService` (serving/engine/service.py) that
changes the bundle: a reload (the admin's, or the watcher's when the link or the
registry alias moves) verifies the new bundle's signature (when a public key is set),
loads and warms it, then swaps it in with one assignment, so requests in flight finish
on the old one; a bundle that fails any of these is refused and the old one keeps
serving. With several server processes,
each follows the others' reloads, publishes its drift window and memory, and beats for
the supervisor, through serving/processes/workers.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from serving.bundle import Bundle, BundleError
from serving.bundle.decoding import Decoder
from serving.bundle.sampling import Sampling
from serving.bundle.signature import verify as verify_signature
from serving.engine.source import BundleSource
from serving.errors import ApiError
from serving.processes.workers import SYNC_INTERVAL_S

if TYPE_CHECKING:
    from serving.monitoring.metrics import ServiceMetrics
    from serving.predlog.writer import PredictionLog
    from serving.processes.workers import WorkerGroup
    from serving.settings import Settings

log = logging.getLogger("serving")

WARM_UP_TEXTS = ["warm up", "a somewhat longer sentence to warm up the model with " * 4]
MEMORY_INTERVAL_S = 5.0


def load_warm(path: Path, settings: Settings, workers: int = 1) -> Bundle:
    """Load a bundle and run it once, as one of `workers` server processes;
    BundleError if it cannot serve. With `TEXTOPS_BUNDLE_PUBLIC_KEY`, a bundle whose
    signature that key does not verify is refused before anything of it is read."""
    if settings.bundle_public_key:
        verify_signature(path, settings.bundle_public_key)
    bundle = Bundle.load(path, settings.precision, settings.runtime_options(workers))
    try:
        if bundle.decoder is not None:
            warm_up_decoder(bundle.decoder)
        else:
            bundle.predict_proba(warm_up_items(bundle))
    except Exception as err:  # noqa: BLE001 - a bundle that cannot predict is broken
        raise BundleError(f"{path}: the model fails on warm-up inputs ({err})") from err
    return bundle


def warm_up_items(bundle: Bundle) -> list:
    """Inputs of the bundle's kind: two texts, or a black and a white image."""
    if bundle.task.items != "images":
        return WARM_UP_TEXTS
    spec = bundle.inputs.spec
    shape = (spec.height, spec.width, spec.channels)
    return [np.zeros(shape, dtype=np.uint8), np.full(shape, 255, dtype=np.uint8)]


def warm_up_decoder(decoder: Decoder) -> None:
    """A next-word model's calls of every shape the service makes: a batched prefill
    (/predict's top-k), then a decoding step where a prompt joins a running sequence.
    Prompts are cut to the model's context (a short one must still warm up)."""
    room = decoder.max_len - 2 if decoder.max_len else None
    prompts = [ids[-room:] if room else ids for ids in decoder.inputs.encode(WARM_UP_TEXTS)]
    decoder.topk(prompts, 1)
    first = decoder.start(prompts[0], Sampling(max_new_tokens=2))
    decoder.advance([first])
    decoder.advance([s for s in (first, decoder.start(prompts[1])) if not s.finished])


class BundleFollowing:
    """Reloads and the syncing of server processes, for `InferenceService`, which sets
    these attributes."""

    settings: Settings
    metrics: ServiceMetrics
    group: WorkerGroup | None
    workers: int
    source: BundleSource
    bundle: Bundle | None
    identity: str | None
    error: str | None
    refused_identity: str | None
    reload_lock: asyncio.Lock
    prediction_log: PredictionLog | None

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
            self.group.starting(self.workers)  # the last worker to serve marks the start

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

    def refresh_evidence(self) -> None:
        """Have the promotion controller's latest decision on the served model read
        again, for /metrics (serving/monitoring/promotion.py; with a registry only, at
        most every few seconds), in a thread that nothing waits for: an unreachable
        registry delays neither readiness nor the watch."""
        if self.bundle is not None and self.metrics.promotion.enabled():
            asyncio.get_running_loop().run_in_executor(
                None, self.metrics.promotion.refresh,
                str(self.bundle.meta.get("model_name", "")))

    async def watch(self) -> None:
        """Follow the bundle spec: reload when the link or the registry alias moves;
        and the challenger's (serving/engine/challenger.py)."""
        while True:
            await asyncio.sleep(self.settings.watch_interval_s)
            if self.settings.challenger:
                await self.refresh_challenger()
            self.refresh_evidence()
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
