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
"""

from __future__ import annotations

import hashlib
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


class Canary:
    """The challenger and its batcher."""

    def __init__(self, challenger: Bundle, settings: Settings, on_batch=None):
        """`on_batch`: the metrics' (drift, batch sizes), which see its traffic too."""
        self.challenger, self.share = challenger, settings.canary_share
        self.failures = 0  # requests it failed, which the champion answered
        self.batcher = Batcher(lambda: challenger, settings.max_batch_size,
                               settings.max_wait_ms, settings.max_queue, on_batch=on_batch,
                               enabled=settings.batching, top_k=settings.max_next_words)

    @property
    def version(self) -> str:
        return self.challenger.version

    def close(self) -> None:
        self.batcher.close()
