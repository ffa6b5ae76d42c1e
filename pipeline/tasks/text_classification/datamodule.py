"""The processed splits as batches: length-grouped for training, padded per batch.

Padding every batch to the longest text *in that batch* and grouping texts of
similar length (SST-2 train spans 2 to 60 tokens) keeps most of each batch real
tokens instead of padding.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, RandomSampler
from transformers.trainer_pt_utils import LengthGroupedSampler

from pipeline.data.splits import column, load_dataset_dir, load_splits, with_train
from pipeline.tasks import fixed_features
from serving.bundle.tensors import pad

# (token ids, label) or, from a transfer set, (token ids, label, the teacher's logits),
# or (a fixed first stage's features, label)
Row = tuple[list[int], int] | tuple[list[int], int, list[float]] | tuple[torch.Tensor, int]
FRONT_BATCH = 256  # texts per pass of a fixed first stage


def collate(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest row, as the service pads (serving.bundle.tensors.pad);
    attention_mask is 1 on real tokens. Rows of fixed features are stacked instead."""
    if isinstance(rows[0][0], torch.Tensor):
        return {"features": torch.stack([row[0] for row in rows]),
                "labels": torch.tensor([row[1] for row in rows])}
    input_ids, attention_mask = pad([row[0] for row in rows], pad_id)
    batch = {"input_ids": torch.from_numpy(input_ids),
             "attention_mask": torch.from_numpy(attention_mask),
             "labels": torch.tensor([row[1] for row in rows])}
    if len(rows[0]) == 3:
        batch["teacher_logits"] = torch.tensor([row[2] for row in rows], dtype=torch.float32)
    return batch


class Collator:
    """A picklable collate function, so DataLoader workers can use it."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        return collate(rows, self.pad_id)


class TextDataModule(pl.LightningDataModule):
    def __init__(
        self,
        processed_dir: Path,
        pad_id: int,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        transfer: Path | None = None,
        front: Callable[[], Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None]
        | None = None,
    ):
        super().__init__()
        self.pad_id = pad_id
        self.collate = Collator(pad_id)
        # builds the model's fixed first stage, if it has one, once the data is there:
        # rows then become its outputs, computed once (pipeline/tasks/fixed_features.py)
        self.build_front = front
        self.front = None
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.processed_dir = processed_dir
        self.transfer = transfer  # a transfer set's dataset: train on it instead
        self.rows: dict[str, list[Row]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.rows:
            return
        # Plain lists: indexing a Python list is far cheaper than an Arrow row lookup.
        for name, ds in load_splits(self.processed_dir).items():
            self.rows[name] = list(zip(column(ds, "input_ids"), column(ds, "label"), strict=True))
        if self.transfer is not None:
            ds = load_dataset_dir(self.transfer)
            self.rows["train"] = list(zip(column(ds, "input_ids"), column(ds, "label"),
                                          column(ds, "teacher_logits"), strict=True))
        self.front = (fixed_features.built_quietly(self.build_front)
                      if self.build_front is not None else None)
        if self.front is not None:
            if self.transfer is not None:
                raise ValueError("distill.teacher: a model with a frozen encoder learns "
                                 "from labels only; set distill.teacher=null")
            self.rows = {name: (self._fixed(rows, f"{name} split")
                                if name in fixed_features.SPLITS else rows)
                         for name, rows in self.rows.items()}

    def _fixed(self, rows: list[Row], name: str) -> list[Row]:
        """Rows as (the front's features, label), in their order; the texts are run
        through the front in batches of similar length."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        chunks = []
        for start in range(0, len(order), FRONT_BATCH):
            batch = collate([rows[i] for i in order[start:start + FRONT_BATCH]], self.pad_id)
            chunks.append((batch["input_ids"], batch["attention_mask"]))
        features = fixed_features.compute(self.front, chunks, len(rows), name)
        placed = [None] * len(rows)
        for position, i in enumerate(order):
            placed[i] = (features[position], rows[i][1])
        return placed

    def with_train_rows(self, indices: list[int]) -> TextDataModule:
        """A copy that trains on these rows of the training split only."""
        return with_train(self, [self.rows["train"][i] for i in indices])

    def train_labels(self) -> list[int]:
        """The training rows' labels, in order (a federated client's label shares)."""
        return [row[1] for row in self.rows["train"]]

    def train_dataloader(self) -> DataLoader:
        rows = self.rows["train"]
        if self.front is not None:  # features are all one length: plain shuffling
            generator = torch.Generator().manual_seed(self.seed)
            return self._loader(rows, sampler=RandomSampler(rows, generator=generator))
        sampler = LengthGroupedSampler(
            self.batch_size,
            lengths=[len(row[0]) for row in rows],
            generator=torch.Generator().manual_seed(self.seed),
        )
        return self._loader(rows, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._by_length("val"))

    def _by_length(self, split: str) -> list[Row]:
        if self.front is not None and split in fixed_features.SPLITS:
            return self.rows[split]
        return sorted(self.rows[split], key=lambda row: len(row[0]))

    def _loader(self, rows: list[Row], sampler=None) -> DataLoader:
        return DataLoader(
            rows,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
