"""Language-model metrics over token blocks: cross-entropy, perplexity (per token and
per word) and top-1 / top-5 next-token accuracy, for any model that gives logits.

A block's inputs are ids[:-1] and its targets ids[1:], as in training, so every
target position is scored once with the context its block gives. The n-gram
baseline (ngram.py) reports through `summarise` too, so both read the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

# (input_ids [b, t] int64 padded with pad_id, attention_mask [b, t] int64) -> logits [b, t, V]
LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def summarise(nll: float, correct1: int, correct5: int, tokens: int,
              words: int | None = None) -> dict:
    """The metrics dict from the sums over every scored position: total negative log
    likelihood (nats), top-1 and top-5 hits, and their count. Perplexity per word
    spreads the same total over the text's words, which compares across tokenizers."""
    if tokens == 0:
        raise ValueError("no target tokens to score (every block is shorter than 2 ids)")
    return {
        "tokens": int(tokens),
        "cross_entropy": nll / tokens,
        "perplexity": math.exp(nll / tokens),
        "perplexity_per_word": math.exp(nll / words) if words else None,
        "top1_accuracy": correct1 / tokens,
        "top5_accuracy": correct5 / tokens,
    }


def score_positions(logits: np.ndarray, targets: np.ndarray) -> tuple[float, int, int]:
    """(NLL sum, top-1 hits, top-5 hits) for logits [n, V] (or log-probabilities)
    and their targets [n]."""
    # float32 throughout ([n, V] float64 copies cost more than the model), with the
    # sums in float64
    logits = np.asarray(logits, dtype=np.float32)
    top = logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=1, dtype=np.float64)) + top[:, 0]
    right = logits[np.arange(len(targets)), targets]
    # rank = how many tokens score strictly above the right one (ties count for it)
    rank = (logits > right[:, None]).sum(axis=1)
    return float((log_z - right).sum()), int((rank < 1).sum()), int((rank < 5).sum())


def batches(blocks: list[list[int]], batch_size: int, pad_id: int):
    """(input_ids, attention_mask, targets) per batch, inputs padded on the right;
    targets hold -1 at padded positions."""
    for start in range(0, len(blocks), batch_size):
        chunk = blocks[start:start + batch_size]
        width = max(len(block) for block in chunk) - 1
        ids = np.full((len(chunk), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(chunk), width), dtype=np.int64)
        targets = np.full((len(chunk), width), -1, dtype=np.int64)
        for row, block in enumerate(chunk):
            n = len(block) - 1
            ids[row, :n], mask[row, :n], targets[row, :n] = block[:-1], 1, block[1:]
        yield ids, mask, targets


def lm_metrics(logits_fn: LogitsFn, blocks: list[list[int]], batch_size: int,
               words: int | None = None, pad_id: int = 0) -> dict:
    """The metrics of `logits_fn` over every target position of `blocks` (lists of
    token ids); `words`, the text's word count, gives perplexity_per_word."""
    nll, correct1, correct5, tokens = 0.0, 0, 0, 0
    for ids, mask, targets in batches(blocks, batch_size, pad_id):
        real = targets >= 0
        logits = np.asarray(logits_fn(ids, mask))[real]
        part = score_positions(logits, targets[real])
        nll, correct1, correct5 = nll + part[0], correct1 + part[1], correct5 + part[2]
        tokens += int(real.sum())
    return summarise(nll, correct1, correct5, tokens, words)
