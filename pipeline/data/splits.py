"""Reading the processed splits: what train, evaluate and deploy share."""

from __future__ import annotations

import copy
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict, load_from_disk

# The held-out slice of production feedback: scored beside the fixed test set, never
# trained on (preprocess writes it, evaluate and the gate read it).
FEEDBACK_TEST = "feedback_test"
# The label of a transfer-set row that only the teacher answered (pipeline/stages/transfer.py);
# -100 is what cross-entropy's ignore_index skips
# (pipeline/tasks/text_classification/classifier.py).
NO_LABEL = -100


def column(ds: Dataset, name: str) -> list:
    """A whole column as a Python list. (`ds[name]` in datasets 5 is a lazy column
    that decodes row by row, about a hundred times slower.)"""
    return ds.with_format("arrow")[name].to_pylist()


def load_dataset_dir(path: Path) -> DatasetDict:
    """A saved DatasetDict, opened so that nothing is ever written back into it.

    `datasets` caches the results of map/select/split next to the source files by
    default, which would change another stage's output behind DVC's back.
    """
    datasets.disable_caching()
    return load_from_disk(str(path))


def load_splits(processed_dir: Path) -> DatasetDict:
    return load_dataset_dir(Path(processed_dir) / "dataset")


def with_train(datamodule, train):
    """A shallow copy of a task's data module whose training split is `train` (a
    federated client's share of the rows); the other splits stay shared."""
    narrowed = copy.copy(datamodule)
    narrowed.rows = {**datamodule.rows, "train": train}
    return narrowed
