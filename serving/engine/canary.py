"""Canary mode: a configured share of requests answered by the challenger
(`TEXTOPS_CHALLENGER` with `TEXTOPS_CHALLENGER_MODE=canary`, `TEXTOPS_CANARY_SHARE`).

Who gets the challenger is decided by a hash of the client's key (`X-Client-Key`),
so the same user keeps seeing the same model; a request without one is routed by its
request id. The challenger has a batcher of its own, so its requests batch together
and never wait behind the champion's. Its answers carry its version and
`"role": "challenger"`, and are logged under its version, so that the labels that come
back score each model on the requests it answered (two proportions,
pipeline/promotion/controller.py).

A classifier's /predict and V2 answers are routed so, and a next-word model's /predict
and V2 top words (the batcher computes them for either bundle). A next-word service's
/generate stays with the champion: its continuations are decoded in the champion's
generator (serving/engine/generation.py), which the challenger has no share of, and
they answer `"role": "champion"` while a canary runs. Their labels (the first word,
as for any continuation) therefore count in the champion's arm, whichever arm the
client's /predict requests fall in.

Guards that need no labels stop a canary at once (`Guard`): too many failed requests,
or a p99 latency too far over the champion's, among the latest each answered. Each
server process guards its own share of the traffic; a stop is named in /metadata.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from typing import TYPE_CHECKING

from serving.engine.batcher import Batcher

if TYPE_CHECKING:
    from serving.bundle import Bundle
    from serving.settings import Settings


def takes(key: str, share: float) -> bool:
    """Whether the challenger answers `key`: the same for a key in every worker and
    replica, and for a share of keys close to `share`."""
    digest = hashlib.blake2b(f"canary:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < share * 2**64


class Guard:
    """The operational guards, which stop a canary at once without waiting for labels:
    over the latest `window` requests each model answered, the challenger's failures
    (at most `max_failures`), and its p99 latency against the champion's (at most
    `max_p99_ratio` times; 0: no latency guard), once each has a quarter of a window
    (20 at least) to go on. Both models' latencies include their batchers' waits."""

    def __init__(self, window: int, max_failures: int, max_p99_ratio: float):
        self.failed: deque[bool] = deque(maxlen=window)
        self.latency: deque[float] = deque(maxlen=window)
        self.champion_latency: deque[float] = deque(maxlen=window)
        self.max_failures, self.max_p99_ratio = max_failures, max_p99_ratio
        self.min_samples = max(20, window // 4)

    def answered(self, seconds: float) -> None:
        self.failed.append(False)
        self.latency.append(seconds)

    def failure(self) -> None:
        self.failed.append(True)

    def champion_answered(self, seconds: float) -> None:
        self.champion_latency.append(seconds)

    def tripped(self) -> str | None:
        """Why the canary must stop now, or None."""
        failed = sum(self.failed)
        if failed >= self.max_failures:
            return f"failed {failed} requests (of its latest {len(self.failed)})"
        if not self.max_p99_ratio or min(len(self.latency), len(self.champion_latency)) \
                < self.min_samples:
            return None
        mine, theirs = p99(self.latency), p99(self.champion_latency)
        if mine > self.max_p99_ratio * theirs:
            return (f"answered its latest {len(self.latency)} requests with a p99 of "
                    f"{mine * 1000:.1f} ms, {mine / theirs:.1f}x the champion's "
                    f"{theirs * 1000:.1f} ms (TEXTOPS_CANARY_MAX_P99_RATIO "
                    f"{self.max_p99_ratio})")
        return None


def p99(seconds: deque[float]) -> float:
    ordered = sorted(seconds)
    return ordered[math.ceil(0.99 * len(ordered)) - 1]


class Canary:
    """The challenger, its batcher and its guards."""

    def __init__(self, challenger: Bundle, settings: Settings, on_batch=None):
        """`on_batch`: the metrics' (drift, batch sizes), which see its traffic too."""
        self.challenger, self.share = challenger, settings.canary_share
        self.guard = Guard(settings.canary_window, settings.canary_max_failures,
                           settings.canary_max_p99_ratio)
        self.batcher = Batcher(lambda: challenger, settings.max_batch_size,
                               settings.max_wait_ms, settings.max_queue, on_batch=on_batch,
                               enabled=settings.batching, top_k=settings.max_next_words)

    @property
    def version(self) -> str:
        return self.challenger.version

    def close(self) -> None:
        self.batcher.close()
