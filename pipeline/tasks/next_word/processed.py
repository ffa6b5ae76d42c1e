"""Reading what next-word preprocess wrote: the profile, and the documents as the texts
a client sends (the blocks in `processed/dataset` hold token ids only); and how the
drift references see a document as a prompt (`typed_lengths`)."""

from __future__ import annotations

import numpy as np

from pipeline import atomic
from pipeline.config import Paths
from pipeline.data.splits import column, load_dataset_dir


def profile_of(paths: Paths) -> dict:
    return atomic.read_json(paths.processed / "profile.json")


def prompts(paths: Paths, split: str) -> list[str]:
    """The split's documents as texts (`processed/documents`)."""
    return column(load_dataset_dir(paths.processed / "documents")[split], "text")


def typed_lengths(lengths: list[int], seed: int = 0) -> np.ndarray:
    """A next-word service's prompts are texts typed so far, not whole documents: the
    drift references cut each document (of n >= 1 tokens) after a seeded choice of
    1..n tokens, so that prompt lengths and surprisal compare with what a service sees.
    Empty documents are left out."""
    rng = np.random.default_rng(seed)
    return np.asarray([int(rng.integers(1, n + 1)) for n in lengths if n > 0], dtype=np.int64)
