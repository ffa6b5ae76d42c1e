"""How surprising a prompt is to the model: the negative log-probability of each of its
tokens given those before it, gathered from the logits of the very calls that feed the
prompt (serving/bundle/decoding.py `Decoder.topk_surprisal`), for the drift monitor."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Measured(Protocol):
    """A sequence being measured (serving/bundle/decoding.py `Sequence`)."""

    surprisal: list[float]
    last_logprobs: tuple[np.ndarray, float] | None


def logsumexp(logits: np.ndarray) -> np.ndarray:
    """Over the last axis, in float32 with float64 sums."""
    top = logits.max(axis=-1)
    return np.log(np.exp(logits - top[..., None]).sum(axis=-1, dtype=np.float64)) + top


def measure(s: Measured, chunk: list[int], logits: np.ndarray, lse: np.ndarray) -> None:
    """Add the surprisal of `chunk`'s tokens, fed in one call whose logits at the
    chunk's positions are `logits` [len(chunk), V] (`lse` their logsumexp): each token
    is scored by the position before it (the first by the previous call's last
    position; the very first token, [EOS], has none). -log p = logsumexp(row) -
    row[token]: only the chosen entries are gathered, no log-softmax table."""
    if s.last_logprobs is not None:  # (the previous call's last logits row, its lse)
        previous, previous_lse = s.last_logprobs
        s.surprisal.append(float(previous_lse - previous[chunk[0]]))
    rows = np.arange(len(chunk) - 1)
    s.surprisal.extend((lse[:-1] - logits[rows, chunk[1:]]).tolist())
    s.last_logprobs = (logits[-1], lse[-1])
