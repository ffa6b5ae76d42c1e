"""Choosing a language model's next token from its logits: greedy, or a seeded sample
with temperature, top-k and top-p (nucleus) filtering.

Numpy only. Each request samples with its own `numpy.random.Generator`, so a seeded
request repeats whatever else the service is generating at the same time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    """How one request chooses its tokens and when it stops.

    temperature 0 is greedy (the most probable token, no randomness); otherwise the
    logits are divided by it, cut to the `top_k` most probable tokens (0: all) and to
    the smallest set whose probability reaches `top_p` (1: all), and sampled.
    `seed` None draws a fresh one (not repeatable). `stop`: texts that end the
    continuation where they first appear (the stop text itself is not returned).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 32
    # tokens made before [EOS] may end the continuation (a stop text or the model's
    # context still may): continuations of a known length, as benchmarks need
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        # A service validates requests first (422 naming the field); these guard the
        # library use.
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, not {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be within 0..max_new_tokens "
                             f"({self.max_new_tokens}), not {self.min_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop sequences must not be empty")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def choose(logits: np.ndarray, settings: Sampling, rng: np.random.Generator) -> int:
    """One token id from one row of logits [vocab] (tokens never to be produced
    already at -inf)."""
    if settings.greedy:
        return int(np.argmax(logits))
    # float64: the cumulative sums below must not depend on float32 rounding
    scaled = logits.astype(np.float64) / settings.temperature
    if 0 < settings.top_k < scaled.size:
        kth = np.partition(scaled, -settings.top_k)[-settings.top_k]
        scaled[scaled < kth] = -np.inf
    probs = np.exp(log_softmax(scaled))
    if settings.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        # keep a token while the ones more probable than it hold less than top_p
        # (the most probable token is always kept)
        probs[order[before >= settings.top_p]] = 0
        probs /= probs.sum()
    # inverse-CDF with one uniform draw: each step consumes exactly one number from
    # the request's generator, so a seed gives the same tokens every time
    cumulative = np.cumsum(probs)
    token = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return min(token, probs.size - 1)
