"""The processed token blocks as language-model batches.

Each row of `processed/dataset` is a block of ids (consecutive blocks overlap by one
token, see preprocess); its inputs are ids[:-1] and its targets ids[1:], so every
token of a split's stream but the first is predicted exactly once. Blocks have the
same length but a split's last, which is padded on the right (pad id in the inputs,
-100 in the labels, which cross-entropy skips). Training batches are reshuffled
every epoch from a generator seeded by the run's seed and the epoch, so a run
repeats batch for batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from pipeline.data.splits import NO_LABEL, column, load_splits, with_train


def collate(blocks: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """{"input_ids", "labels"} [b, longest - 1], padded on the right."""
    width = max(len(block) for block in blocks) - 1
    input_ids = np.full((len(blocks), width), pad_id, dtype=np.int64)
    labels = np.full((len(blocks), width), NO_LABEL, dtype=np.int64)
    for row, block in enumerate(blocks):
        input_ids[row, :len(block) - 1] = block[:-1]
        labels[row, :len(block) - 1] = block[1:]
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}


class Collator:
    """A picklable collate function, so DataLoader workers can use it."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, blocks: list[list[int]]) -> dict[str, torch.Tensor]:
        return collate(blocks, self.pad_id)


class EpochSeededSampler(torch.utils.data.Sampler):
    """A permutation per epoch, seeded by (seed, epoch); Lightning calls set_epoch."""

    def __init__(self, rows: int, seed: int):
        self.rows, self.seed, self.epoch = rows, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.rows

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        return iter(rng.permutation(self.rows).tolist())


class NextWordDataModule(pl.LightningDataModule):
    def __init__(self, processed_dir: Path, pad_id: int, batch_size: int, seed: int,
                 num_workers: int = 0):
        super().__init__()
        self.processed_dir = Path(processed_dir)
        self.collate = Collator(pad_id)
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        # split -> blocks (plain lists: far cheaper to index than Arrow rows); the
        # training loop's report counts len(rows["train"])
        self.rows: dict[str, list[list[int]]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.rows:
            return
        for name, ds in load_splits(self.processed_dir).items():
            self.rows[name] = column(ds, "ids")

    def with_train_rows(self, indices: list[int]) -> NextWordDataModule:
        """A copy that trains on these blocks of the training split only."""
        return with_train(self, [self.rows["train"][i] for i in indices])

    def train_labels(self) -> None:
        """None: blocks of text have next words, not labels."""
        return None

    def train_dataloader(self) -> DataLoader:
        rows = self.rows["train"]
        return self._loader(rows, EpochSeededSampler(len(rows), self.seed))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.rows["val"])

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.rows["test"])

    def _loader(self, rows: list[list[int]], sampler=None) -> DataLoader:
        return DataLoader(rows, batch_size=self.batch_size, sampler=sampler,
                          collate_fn=self.collate, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)
