"""Reading what next-word preprocess wrote: the profile, and the documents as the texts
a client sends (the blocks in `processed/dataset` hold token ids only)."""

from __future__ import annotations

from pipeline import atomic
from pipeline.config import Paths
from pipeline.data.splits import column, load_dataset_dir


def profile_of(paths: Paths) -> dict:
    return atomic.read_json(paths.processed / "profile.json")


def prompts(paths: Paths, split: str) -> list[str]:
    """The split's documents as texts (`processed/documents`)."""
    return column(load_dataset_dir(paths.processed / "documents")[split], "text")
