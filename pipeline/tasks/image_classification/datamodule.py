"""The processed image splits as batches: normalised once, held in memory, and cut into
batches by index, with seeded augmentation of the training batches.

Each split is normalised once with the bundle's own `ImageSpec.normalise` (what the
service computes), into one float32 tensor (Fashion-MNIST's training split: 54,000 x
784 floats, 170 MB). A batch is then one indexing of that tensor, not a collation of
its images one by one. Shuffling and augmentation draw from generators seeded by the
seed, the epoch and the batch's position, so a run repeats batch for batch, whether
resumed mid-way or run with data loader workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline import atomic
from pipeline.data.splits import column, load_splits, with_train
from pipeline.tasks import fixed_features
from pipeline.tasks.image_classification.arrays import pixels as split_pixels
from serving.bundle.images import ImageSpec

SPEC_FILE = "image_spec.json"
AUGMENT_OPTIONS = ("crop_padding", "flip")
CHUNK = 1024  # images per pass of a fixed first stage


def generator(*seeds: int) -> torch.Generator:
    """A generator seeded by all of `seeds` together (the run's seed, the epoch, ...)."""
    state = np.random.SeedSequence([int(s) for s in seeds]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class Images(Dataset):
    """A split's normalised pixels and labels; indexed by a batch's indices at once.

    `background` is the normalised value of the spec's fill colour, per channel: what
    a random shift uncovers, as the service's padding would show it. `key`: "pixels",
    or "features" where `pixels` holds a model's fixed features instead.
    """

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, background: torch.Tensor,
                 augment: dict | None = None, seed: int = 0, key: str = "pixels"):
        self.pixels, self.labels, self.background = pixels, labels, background
        self.key = key
        self.augment = dict(augment or {})
        unknown = sorted(set(self.augment) - set(AUGMENT_OPTIONS))
        if unknown:
            raise ValueError(f"train.augment: unknown option(s) {', '.join(unknown)} "
                             f"({', '.join(AUGMENT_OPTIONS)})")
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int, torch.Tensor]) -> dict[str, torch.Tensor]:
        epoch, number, indices = key
        batch = self.pixels[indices]
        if self.augment.get("crop_padding") or self.augment.get("flip"):
            batch = self._augmented(batch, generator(self.seed, epoch, number))
        return {self.key: batch, "labels": self.labels[indices]}

    def _augmented(self, batch: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        size, channels, height, width = batch.shape
        shift = int(self.augment.get("crop_padding") or 0)
        if shift:
            # Pad by `shift` on every side and crop each image back at its own random
            # offset: a shift of up to `shift` pixels in each direction.
            padded = self.background.expand(size, channels, height + 2 * shift,
                                            width + 2 * shift).clone()
            padded[:, :, shift:shift + height, shift:shift + width] = batch
            rows = torch.randint(0, 2 * shift + 1, (size, 1), generator=rng)
            cols = torch.randint(0, 2 * shift + 1, (size, 1), generator=rng)
            rows = (rows + torch.arange(height))[:, :, None]  # [B, H, 1]
            cols = (cols + torch.arange(width))[:, None, :]  # [B, 1, W]
            images = torch.arange(size)[:, None, None]
            # Channels last for the gather, so the three index tensors broadcast together.
            batch = padded.permute(0, 2, 3, 1)[images, rows, cols].permute(0, 3, 1, 2)
            batch = batch.contiguous()
        if self.augment.get("flip"):
            flipped = torch.rand(size, generator=rng) < 0.5
            batch = torch.where(flipped[:, None, None, None], batch.flip(-1), batch)
        return batch


class Batches(Sampler):
    """(epoch, batch number, indices) for each batch: shuffled per epoch from a generator
    seeded by the seed and the epoch, or in order. Lightning calls `set_epoch` before
    each training epoch."""

    def __init__(self, rows: int, batch_size: int, shuffle: bool, seed: int = 0):
        self.rows, self.batch_size, self.shuffle, self.seed = rows, batch_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.rows // self.batch_size)

    def __iter__(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        if self.shuffle:
            order = torch.randperm(self.rows, generator=generator(self.seed, self.epoch))
        else:
            order = torch.arange(self.rows)
        for number, start in enumerate(range(0, self.rows, self.batch_size)):
            yield self.epoch, number, order[start:start + self.batch_size]


class PoissonBatches(Batches):
    """Batches by Poisson sampling, as differentially private training assumes
    (pipeline/modeling/privacy.py): each of the epoch's batches holds every row with
    probability `sample_rate`, independently, so batch sizes vary (and one may be
    empty); drawn from a generator seeded by the seed, the epoch and the batch."""

    def __init__(self, rows: int, sample_rate: float, seed: int = 0):
        super().__init__(rows, max(1, round(sample_rate * rows)), shuffle=True, seed=seed)
        self.sample_rate = sample_rate

    def __len__(self) -> int:
        return round(1 / self.sample_rate)

    def __iter__(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        for number in range(len(self)):
            rng = generator(self.seed, self.epoch, number)
            chosen = torch.rand(self.rows, generator=rng) < self.sample_rate
            yield self.epoch, number, chosen.nonzero()[:, 0]


class ImageDataModule(pl.LightningDataModule):
    def __init__(
        self,
        processed_dir: Path,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        augment: dict | None = None,
        front: Callable[[], Callable[[torch.Tensor], torch.Tensor] | None] | None = None,
    ):
        super().__init__()
        self.processed_dir = Path(processed_dir)
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.augment = dict(augment or {})
        # builds the model's fixed first stage, if it has one, once the data is there:
        # batches then carry its outputs, computed once (pipeline/tasks/fixed_features.py)
        self.build_front = front
        self.spec: ImageSpec | None = None
        # split -> Images; named as the text data module's, which the training loop's
        # report counts (len(datamodule.rows["train"])).
        self.rows: dict[str, Images] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.rows:
            return
        self.spec = ImageSpec.from_dict(atomic.read_json(self.processed_dir / SPEC_FILE))
        fill = np.full((1, self.spec.height, self.spec.width, self.spec.channels),
                       self.spec.fill, dtype=np.uint8)
        background = torch.from_numpy(self.spec.normalise(fill)[:, :, :1, :1].copy())
        front = (fixed_features.built_quietly(self.build_front)
                 if self.build_front is not None else None)
        if front is not None and self.augment:
            raise ValueError("train.augment: this model computes its features once per "
                             "image; set model.augment=false")
        for name, ds in load_splits(self.processed_dir).items():
            pixels = torch.from_numpy(self.spec.normalise(split_pixels(ds)))
            labels = torch.tensor(column(ds, "label"), dtype=torch.int64)
            if front is not None and name in fixed_features.SPLITS:
                chunks = [(pixels[i:i + CHUNK],) for i in range(0, len(pixels), CHUNK)]
                features = fixed_features.compute(front, chunks, len(pixels),
                                                  f"{name} split")
                self.rows[name] = Images(features, labels, background, None, self.seed,
                                         key="features")
                continue
            augment = self.augment if name == "train" else None
            self.rows[name] = Images(pixels, labels, background, augment, self.seed)

    def with_train_rows(self, indices: list[int]) -> ImageDataModule:
        """A copy that trains on these images of the training split only."""
        train = self.rows["train"]
        keep = torch.as_tensor(indices, dtype=torch.int64)
        return with_train(self, Images(train.pixels[keep], train.labels[keep],
                                       train.background, train.augment, train.seed,
                                       train.key))

    def train_labels(self) -> list[int]:
        """The training images' labels, in order (a federated client's label shares)."""
        return self.rows["train"].labels.tolist()

    def train_dataloader(self) -> DataLoader:
        self.rows["train"].seed = self.seed  # augmentation draws follow the module's seed
        return self._loader("train", shuffle=True)

    def poisson_train_dataloader(self, sample_rate: float, seed: int) -> DataLoader:
        """The training batches by Poisson sampling, drawn from `seed` (PoissonSampling
        calls it with a secret one: the loader yields whole batches, which Opacus's own
        sampling cannot make)."""
        images = self.rows["train"]
        loader = DataLoader(images, batch_size=None,
                            sampler=PoissonBatches(len(images), sample_rate, seed),
                            num_workers=self.num_workers,
                            persistent_workers=self.num_workers > 0)
        loader.sample_rate = sample_rate
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        images = self.rows[split]
        # batch_size=None: the sampler yields whole batches' indices and the dataset
        # returns the batch, so the loader neither collates nor batches again.
        return DataLoader(
            images,
            batch_size=None,
            sampler=Batches(len(images), self.batch_size, shuffle, self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
