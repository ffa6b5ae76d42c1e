"""The challenger beside the champion, for `InferenceService`: shadow mode
(serving/engine/shadow.py) or canary mode (serving/engine/canary.py), following
`TEXTOPS_CHALLENGER` as the champion's bundle is followed.

On every watch tick (and at start) the challenger's spec is resolved again: once a
champion serves, the challenger is loaded; when the alias (or link) moves, the new
one replaces it; when it is gone (the controller promoted or retired it) or is the
champion itself, shadow or canary stops. A challenger that cannot stand beside the
champion is named in /metadata (`challenger.error`) and the champion serves on; so is
a shadow whose worker could not load the challenger or died: the next tick stops
shadow mode, and the challenger is not loaded again until its spec points elsewhere.

A canary its guards stopped in one server process is stopped in all: the stop is
recorded in the prediction log, which every worker and replica reads on its watch
tick (serving/predlog/canary_stops.py). Once a person clears the stop (`textops
clear-stop`), the next tick starts that canary again, as it does when the alias
comes back to a version after it was gone.

In shadow mode the challenger scores the requests the prediction log keeps
(`TEXTOPS_PREDICTION_LOG_SAMPLE`), since its answers to the others would not be
logged; without a log, every request (the agreement counters are then all it gives).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

from serving.engine.canary import Canary, takes
from serving.engine.shadow import Shadow, load_challenger
from serving.engine.source import BundleSource
from serving.errors import ApiError
from serving.predlog.canary_stops import CanaryStops
from serving.predlog.rows import sampled

if TYPE_CHECKING:
    import numpy as np

    from serving.bundle import Bundle

log = logging.getLogger("serving")
STOPS_WAIT_S = 2.0  # the longest a watch tick waits on the log's canary stops
# the registry's answers when an alias or version does not exist (or no longer)
GONE = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def is_gone(spec: str, err: Exception) -> bool:
    """Whether `err`, resolving `spec`, says the challenger is gone (not that the
    tracking server is briefly unreachable)."""
    if not spec.startswith("models:/"):
        return not os.path.exists(spec)
    return getattr(err, "error_code", None) in GONE


class Challenging:
    """Shadow or canary state and its upkeep; `InferenceService` mixes it in."""

    def init_challenger(self) -> None:
        self.shadow: Shadow | None = None  # a challenger in shadow mode
        self.canary: Canary | None = None  # ... or in canary mode
        self.shadow_error: str | None = None  # why the configured one does not run
        self.challenger_identity: str | None = None  # what is loaded, or was refused
        # a canary version its guards stopped (here or in another process), until a
        # person clears the stop (`textops clear-stop`)
        self.stopped_canary: str | None = None
        # canary stops shared with the other workers and replicas (the log's)
        self.canary_stops = (CanaryStops(self.prediction_log.url)
                             if self.prediction_log is not None else None)
        self.stops_call: asyncio.Future | None = None  # the one in flight, if any
        self.stop_recorded: asyncio.Future | None = None  # this process's, being written

    async def refresh_challenger(self) -> None:
        await self._follow_challenger()
        if self.canary_stops is None:  # no log: each process guards its own canary
            return
        if self.canary is not None:
            await self._follow_canary_stop(self.canary)
        elif self.canary_stops.pending:
            await self._ask_stops(self.canary_stops.flush)  # a stop not written yet
        elif self.stopped_canary is not None:
            await self._follow_cleared_stop(self.stopped_canary)

    async def _follow_challenger(self) -> None:
        spec = self.settings.challenger
        if not spec or self.bundle is None:
            return
        if self.shadow is not None and self.shadow.dead is not None:
            await self.stop_challenger(f"shadow mode off: the challenger "
                                       f"{self.shadow.version} ({spec}) no longer scores: "
                                       f"{self.shadow.dead}")
        try:
            identity = await asyncio.to_thread(BundleSource(spec, self.settings.cache_dir)
                                               .identity)
        except Exception as err:  # noqa: BLE001 - gone, or the registry is unreachable
            if not is_gone(spec, err):
                log.warning("cannot check the challenger %s: %s", spec, err)
                return
            # what comes back later, the same version too, is a new challenge
            self.challenger_identity = self.stopped_canary = None
            if self.shadow or self.canary:
                await self.stop_challenger(f"{spec} is gone ({err}); the champion alone "
                                           "serves")
            return
        running = self.shadow or self.canary
        if identity == self.challenger_identity and (
                running is None or running.version != self.bundle.version):
            return  # as it was (loaded, or refused)
        await self.stop_challenger(None)
        self.challenger_identity = identity
        await self.start_challenger()

    async def start_challenger(self) -> None:
        mode = self.settings.challenger_mode
        try:  # loading it, and starting what runs it (a process, queues), may fail
            challenger = await asyncio.to_thread(load_challenger, self.settings, self.bundle,
                                                 mode == "shadow", self.workers)
            if challenger.version == self.bundle.version:
                self.shadow_error = (f"{self.settings.challenger} is the champion "
                                     f"({challenger.version}): nothing to compare")
                return
            if mode == "canary" and self.canary_stops is not None and (
                    why := await self._ask_stops(self.canary_stops.reason, challenger.version)):
                self.shadow_error = (f"canary stopped: the challenger {challenger.version} "
                                     f"{why} (recorded in the prediction log)")
                self.stopped_canary = challenger.version
                log.warning("%s; the champion alone serves", self.shadow_error)
                return
            self.stopped_canary = None
            if mode == "canary":
                self.canary = Canary(challenger, self.settings, self.metrics.observe_batch)
            else:
                self.shadow = await asyncio.to_thread(
                    Shadow, challenger, self.settings, self.metrics, self.prediction_log,
                    self.settings.shadow_queue, self.settings.max_batch_size)
        except Exception as err:  # noqa: BLE001 - a challenger never stops the service
            self.shadow_error = f"{self.settings.challenger}: {err}"
            log.error("%s mode off: %s", mode, self.shadow_error)
            return
        self.shadow_error = None
        if mode == "canary":
            log.info("canary mode: challenger %s answers %.0f%% of the clients",
                     challenger.version, 100 * self.settings.canary_share)
        else:
            log.info("shadow mode: challenger %s scores every answered request the log "
                     "keeps", challenger.version)

    async def stop_challenger(self, why: str | None) -> None:
        running, self.shadow, self.canary = self.shadow or self.canary, None, None
        if why:
            self.shadow_error = why
            log.warning("%s", why)
        if running is not None:
            await asyncio.to_thread(running.close)

    # ------------------------------------------------------------ the request path

    def shadow_score(self, request_id: str, items: list, probs: np.ndarray, by: Bundle,
                     encoded: list | None = None) -> None:
        """Offer a classifier request that `by` answered to the challenger, with the
        token ids `by`'s tokenizer made of its texts (`encoded`); never blocks."""
        if (shadow := self._shadowing(request_id)) is not None:
            shadow.offer(request_id, items, probs, encoded=encoded, by=by)

    def shadow_next_words(self, request_id: str, texts: list[str], top_words: list[str],
                          k: int) -> None:
        """Offer an answered next-word request (each text's top word, as the champion
        answered) to the challenger, which logs its `k` top words; never blocks."""
        if (shadow := self._shadowing(request_id)) is not None:
            shadow.offer(request_id, texts, top_words, k)

    def _shadowing(self, request_id: str) -> Shadow | None:
        """The shadow, if one runs and the prediction log (if any) keeps `request_id`."""
        shadow, predictions = self.shadow, self.prediction_log
        if shadow is None or (predictions is not None
                              and not sampled(request_id, predictions.sample)):
            return None
        return shadow

    async def canary_answer(self, texts: list, key: str | None):
        """The challenger's (probabilities, or a next-word model's top words; bundle)
        when a canary runs and takes `key`; None: the champion answers. A request the
        challenger fails, or has no room for, is answered by the champion; its guards
        (serving/engine/canary.py `Guard`: failures, p99 against the champion's) stop
        the canary at once, without waiting for labels."""
        canary = self.canary
        if canary is None or key is None or not takes(key, canary.share):
            return None
        started = time.perf_counter()
        try:
            answered = await self._bounded(canary.batcher.submit(texts))
        except ApiError as err:
            if err.status != 503:
                self._canary_failed(canary, err)
                raise  # a timeout: the request's time is spent
            return None  # its queue is full: the champion answers
        except Exception as err:  # noqa: BLE001 - the champion answers instead
            self._canary_failed(canary, err)
            return None
        canary.guard.answered(time.perf_counter() - started)
        self._check_canary(canary)
        return answered

    def champion_answered(self, seconds: float) -> None:
        """What the champion's answer took, while a canary runs (its latency guard)."""
        if self.canary is not None:
            self.canary.guard.champion_answered(seconds)

    def _canary_failed(self, canary: Canary, err: Exception) -> None:
        self.metrics.shadow.labels("failed").inc()
        canary.guard.failure()
        log.error("canary: the challenger %s failed a request (%s: %s)", canary.version,
                  type(err).__name__, err)
        self._check_canary(canary)

    def _check_canary(self, canary: Canary) -> None:
        why = canary.guard.tripped()
        if why is None or self.canary is not canary:
            return
        self.canary, self.stopped_canary = None, canary.version
        self.shadow_error = f"canary stopped: the challenger {canary.version} {why}"
        log.error("%s; every request goes to the champion", self.shadow_error)
        loop = asyncio.get_running_loop()
        loop.run_in_executor(None, canary.close)
        if self.canary_stops is not None and self.bundle is not None:
            self.stop_recorded = loop.run_in_executor(
                None, self.canary_stops.record, canary.version, self.bundle.version, why)

    async def close_canary_stops(self) -> None:
        """At shutdown: a stop of this process's still being written gets its chance
        (at most STOPS_WAIT_S), then the connection closes."""
        if self.canary_stops is None:
            return
        if self.stop_recorded is not None:
            await asyncio.wait([self.stop_recorded], timeout=STOPS_WAIT_S)
        await asyncio.to_thread(self.canary_stops.close)

    async def _follow_canary_stop(self, canary: Canary) -> None:
        """Stop `canary` if another server process recorded that its guards tripped."""
        why = await self._ask_stops(self.canary_stops.reason, canary.version)
        if why is not None and self.canary is canary:
            await self.stop_challenger(f"canary stopped: the challenger {canary.version} "
                                       f"{why} (seen by another server process); every "
                                       "request goes to the champion")
            self.stopped_canary = canary.version

    async def _follow_cleared_stop(self, version: str) -> None:
        """Start `version`'s canary again once a person cleared its stop (`textops
        clear-stop`); a log that cannot be read now leaves it stopped."""
        answer = await self._ask_stops(lambda: (self.canary_stops.reason(version),))
        if answer == (None,) and self.stopped_canary == version and self.canary is None:
            log.warning("canary: the stop of the challenger %s was cleared; its canary "
                        "starts again", version)
            await self.start_challenger()

    async def _ask_stops(self, call, *args):
        """`call(*args)` (a CanaryStops method) off the event loop, waited for at most
        STOPS_WAIT_S and one at a time, so that a database that hangs holds up no watch
        tick (a champion's reload comes first); None when the call failed (CanaryStops
        logs it), timed out, or finds one still waiting: the next tick asks again."""
        if self.stops_call is not None and not self.stops_call.done():
            return None
        self.stops_call = asyncio.ensure_future(asyncio.to_thread(call, *args))
        try:
            return await asyncio.wait_for(asyncio.shield(self.stops_call), STOPS_WAIT_S)
        except Exception:  # noqa: BLE001 - see the docstring
            return None

    def role(self, bundle: Bundle) -> dict:
        """What an answer says of the model that gave it while a canary runs."""
        if self.canary is None:
            return {}
        return {"role": "challenger" if bundle is self.canary.challenger else "champion"}
