"""The n-gram baseline: interpolated Kneser-Ney (Chen & Goodman, 1998) of a configured
order and absolute discount, fitted on the training split's token stream and scored
on the same blocks as the neural model, with the same metrics (evaluation.py).

    P(w | h) = max(c(h w) - D, 0) / c(h) + D * N1+(h .) / c(h) * P(w | h')

where h' drops h's oldest token. The highest order counts n-grams; lower orders count
continuations, N1+(. h w), the distinct tokens seen before h w (a word seen often but
after few contexts, like "Francisco", gets little backed-off mass); the unigram level
is interpolated with the uniform distribution, so every token of the vocabulary has
some probability. A context never seen in training hands all its mass to the next
order down. A position with fewer than order - 1 tokens before it in its block (the
block's first targets) uses the order its context allows, with n-gram counts at the
top, as a model of that order would.

Top-1 / top-5 accuracy need the whole next-token distribution at every position, so
each order is a sparse matrix (context -> discounted, normalised counts over the
vocabulary) and a batch of positions is a few sparse row gathers added onto dense
[positions, V] arrays: Tiny Shakespeare's 25k test tokens over 6k words take a few
seconds. (Libraries were considered: nltk's KneserNeyInterpolated scores one word at
a time in Python, hours for 150M (position, word) pairs; kenlm's PyPI module only
queries, needing its C++ lmplz to estimate a model, fits modified KN's three
discounts rather than a configured one, and also answers word by word.)
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from pipeline.tasks.next_word.evaluation import score_positions, summarise


def stream_of(blocks: list[list[int]]) -> np.ndarray:
    """A split's token stream from its blocks, which overlap by one token."""
    if not blocks:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(list(blocks[0]) + [t for block in blocks[1:] for t in block[1:]],
                      dtype=np.int64)


def windows(stream: np.ndarray, n: int) -> np.ndarray:
    """Every n-gram of the stream, [len - n + 1, n]."""
    return np.lib.stride_tricks.sliding_window_view(stream, n)


class Level:
    """One order k >= 2: for each seen context (k - 1 tokens), its discounted and
    normalised counts over the vocabulary (a sparse row) and its backoff weight."""

    def __init__(self, grams: np.ndarray, counts: np.ndarray, vocab_size: int,
                 discount: float):
        keys = encode(grams[:, :-1], vocab_size)
        self.keys, row = np.unique(keys, return_inverse=True)
        total = np.bincount(row, weights=counts)
        types = np.bincount(row)
        data = np.maximum(counts - discount, 0.0) / total[row]
        # one extra empty row, with weight 1, for contexts never seen
        shape = (len(self.keys) + 1, vocab_size)
        self.table = sparse.csr_matrix((data, (row, grams[:, -1])), shape=shape)
        self.backoff = np.append(discount * types / total, 1.0)

    def rows(self, contexts: np.ndarray, vocab_size: int) -> np.ndarray:
        """The table row of each context [n, k - 1]; the empty row where unseen."""
        keys = encode(contexts, vocab_size)
        at = np.searchsorted(self.keys, keys).clip(max=max(len(self.keys) - 1, 0))
        seen = len(self.keys) > 0
        found = (self.keys[at] == keys) if seen else np.zeros(len(keys), bool)
        return np.where(found, at, len(self.keys))

    def apply(self, lower: np.ndarray, contexts: np.ndarray, vocab_size: int) -> np.ndarray:
        rows = self.rows(contexts, vocab_size)
        return self.table[rows].toarray() + self.backoff[rows][:, None] * lower


def encode(contexts: np.ndarray, vocab_size: int) -> np.ndarray:
    """Each row of token ids as one int64 (base vocab_size)."""
    keys = np.zeros(len(contexts), dtype=np.int64)
    for column in range(contexts.shape[1]):
        keys = keys * vocab_size + contexts[:, column]
    return keys


def counted(grams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of `grams` and how often each occurs."""
    return np.unique(grams, axis=0, return_counts=True)


class KneserNey:
    """Interpolated Kneser-Ney over token ids 0..vocab_size - 1."""

    def __init__(self, order: int = 3, discount: float = 0.75):
        if order < 1:
            raise ValueError(f"baseline.order: must be at least 1, not {order}")
        if not 0.0 < discount < 1.0:
            raise ValueError(f"baseline.discount: must lie in (0, 1), not {discount}")
        self.order, self.discount = order, discount

    def fit(self, stream: np.ndarray, vocab_size: int) -> KneserNey:
        stream = np.asarray(stream, dtype=np.int64)
        if len(stream) < self.order:
            raise ValueError(f"the training stream has {len(stream)} tokens, fewer than "
                             f"the baseline's order {self.order}")
        if vocab_size ** max(self.order - 1, 1) >= 2 ** 62:
            raise ValueError(f"baseline.order: {self.order}-grams over {vocab_size} "
                             "tokens do not fit the context keys")
        self.vocab_size, d = vocab_size, self.discount
        # Continuation counts of every k-gram: its distinct left neighbours.
        continuation = {}
        for k in range(1, self.order):
            suffixes = np.unique(windows(stream, k + 1), axis=0)[:, 1:]
            continuation[k] = counted(suffixes)
        raw = {k: counted(windows(stream, k)) for k in range(1, self.order + 1)}
        # Level 1: unigrams (continuation counts unless the model is a unigram model),
        # interpolated with the uniform distribution.
        # (a position with no context at all uses the raw unigram counts on top)
        self.unigram = self._unigram(*(continuation[1] if self.order > 1 else raw[1]))
        self.top_unigram = self._unigram(*raw[1])
        # Orders 2..order: continuation levels below the top, raw n-gram levels for
        # whatever order is on top (the full order, or a short context's).
        self.continued = {k: Level(*continuation[k], vocab_size, d)
                          for k in range(2, self.order)}
        self.raw = {k: Level(*raw[k], vocab_size, d) for k in range(2, self.order + 1)}
        return self

    def _unigram(self, grams: np.ndarray, counts: np.ndarray) -> np.ndarray:
        p1 = np.zeros(self.vocab_size)
        np.add.at(p1, grams[:, 0], np.maximum(counts - self.discount, 0.0))
        total = counts.sum()
        return p1 / total + self.discount * len(counts) / total / self.vocab_size

    def distributions(self, contexts: np.ndarray) -> np.ndarray:
        """P(. | context) [n, V] for contexts [n, m] of one length m < order (the
        most recent token last)."""
        contexts = np.asarray(contexts, dtype=np.int64).reshape(len(contexts), -1)
        m = min(contexts.shape[1], self.order - 1)
        contexts = contexts[:, contexts.shape[1] - m:]
        if m == 0:
            return np.tile(self.top_unigram, (len(contexts), 1))
        probs = np.tile(self.unigram, (len(contexts), 1))
        for k in range(2, m + 2):
            level = self.raw[k] if k == m + 1 else self.continued[k]
            probs = level.apply(probs, contexts[:, m - (k - 1):], self.vocab_size)
        return probs

    def score(self, blocks: list[list[int]], words: int | None = None,
              chunk: int = 1024) -> dict:
        """lm_metrics' dict for the blocks' targets (ids[1:] of each), each conditioned
        on up to order - 1 tokens before it in its block."""
        width = self.order - 1
        by_length: dict[int, tuple[list, list]] = {}
        for block in blocks:
            for j in range(1, len(block)):
                context = block[max(0, j - width):j]
                group = by_length.setdefault(len(context), ([], []))
                group[0].append(context)
                group[1].append(block[j])
        nll, correct1, correct5, tokens = 0.0, 0, 0, 0
        for contexts, targets in by_length.values():
            contexts = np.asarray(contexts, dtype=np.int64).reshape(len(targets), -1)
            targets = np.asarray(targets, dtype=np.int64)
            for start in range(0, len(targets), chunk):
                probs = self.distributions(contexts[start:start + chunk])
                part = score_positions(np.log(probs), targets[start:start + chunk])
                nll, correct1, correct5 = (nll + part[0], correct1 + part[1],
                                           correct5 + part[2])
            tokens += len(targets)
        return summarise(nll, correct1, correct5, tokens, words)


def kn_metrics(train_blocks: list[list[int]], blocks: list[list[int]], vocab_size: int,
               order: int = 3, discount: float = 0.75, words: int | None = None) -> dict:
    """Fit on the training blocks' stream, score `blocks`: the baseline's metrics."""
    model = KneserNey(order, discount).fit(stream_of(train_blocks), vocab_size)
    return model.score(blocks, words)
