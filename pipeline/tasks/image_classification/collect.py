"""collect for images: IDX files, CIFAR-10 batches or a folder per class -> data/raw.

Every image is converted to the configured `data.image` (size, channels, resize rule;
serving/bundle/images.py) as it is read, so that later stages see one shape; the
manifest records that policy and where each split came from. What cannot be read
stops the stage naming the file (pipeline/tasks/image_classification/readers.py),
before anything is written.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from datasets import DatasetDict
from omegaconf import DictConfig, OmegaConf

from pipeline import atomic
from pipeline.config import Paths
from pipeline.data.readers import CollectError
from pipeline.tasks.image_classification import readers
from pipeline.tasks.image_classification.arrays import to_dataset
from pipeline.tasks.image_classification.feedback import read_feedback_images
from serving.bundle.images import ImageError, ImageSpec

SOURCES = ("idx", "cifar", "folder")


@dataclass
class RawImages:
    """One split as read: converted pixels, labels, groups ('' where none) and where
    it came from."""

    pixels: np.ndarray  # uint8 [n, height, width, channels]
    labels: np.ndarray  # int64 [n]
    groups: list[str]
    origin: str
    sha256: str


def source_spec(data: DictConfig) -> ImageSpec:
    """The conversion policy of `data.image`, before preprocess fits mean and std."""
    image = OmegaConf.to_container(data.image, resolve=True)
    try:
        return ImageSpec.from_dict({**image, "mean": [0.0] * image["channels"],
                                    "std": [1.0] * image["channels"]})
    except (ValueError, KeyError, TypeError) as err:
        raise CollectError(f"data.image: {err}") from None


def file_digest(*files: Path) -> str:
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def convert(pixels: np.ndarray, spec: ImageSpec, origin: str) -> np.ndarray:
    """Source pixels ([n, h, w] or [n, h, w, c]) at the spec's size and channels."""
    if pixels.ndim == 3:
        pixels = pixels[..., None]
    if pixels.shape[1:] == (spec.height, spec.width, spec.channels):
        return np.ascontiguousarray(pixels)
    try:
        return np.stack([spec.from_array(image, f"{origin}[{i}]")
                         for i, image in enumerate(pixels)])
    except ImageError as err:
        raise CollectError(str(err)) from None


def read_idx_splits(data: DictConfig, spec: ImageSpec, root: Path) -> dict[str, RawImages]:
    splits = {}
    for split, files in data.splits.items():
        images, labels = root / files.images, root / files.labels
        pixels, values = readers.read_idx(images, labels)
        splits[split] = RawImages(convert(pixels, spec, str(files.images)), values,
                                  [""] * len(values), f"{files.images} + {files.labels}",
                                  file_digest(images, labels))
    return splits


def read_cifar_splits(data: DictConfig, spec: ImageSpec, root: Path
                      ) -> tuple[dict[str, RawImages], list[str]]:
    if not data.get("path"):
        raise CollectError("data.path: the directory of CIFAR-10's python batches "
                           "(-S data.path=/path/to/cifar-10-batches-py)")
    directory = root / data.path
    batches, names = readers.read_cifar(directory)
    splits = {split: RawImages(convert(pixels, spec, f"{directory}/{split}"), labels,
                               [""] * len(labels), str(directory),
                               file_digest(*sorted(directory.glob("*_batch*"))))
              for split, (pixels, labels) in batches.items()}
    return splits, names


def read_folder_splits(data: DictConfig, spec: ImageSpec, root: Path
                       ) -> tuple[dict[str, RawImages], list[str]]:
    if not data.get("path"):
        raise CollectError("data.path: the folder of class folders (-S data.path=images)")
    names = list(data.label_names) if data.get("label_names") else None
    splits = {}
    for split, key, manifest_key in (("train", "path", "manifest"),
                                     ("test", "test_path", "test_manifest")):
        if not data.get(key):
            continue
        folder = root / data[key]
        manifest = root / data[manifest_key] if data.get(manifest_key) else None
        pixels, labels, groups, names, files = readers.read_folder(folder, spec, manifest,
                                                                   names)
        digest = hashlib.sha256("\n".join(files).encode() + pixels.tobytes()).hexdigest()
        groups = groups if manifest is not None and data.get("group_column") else [""] * len(
            labels)
        splits[split] = RawImages(pixels, labels, list(groups), str(data[key]), digest)
    return splits, names


def sample(raw: RawImages, max_rows: int | None, seed: int) -> tuple[RawImages, np.ndarray]:
    """A seeded sample of at most `max_rows` images, in source order; their rows."""
    rows = np.arange(len(raw.labels))
    if max_rows is not None and len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).permutation(len(rows))[:max_rows])
        raw = RawImages(raw.pixels[rows], raw.labels[rows], [raw.groups[i] for i in rows],
                        raw.origin, raw.sha256)
    return raw, rows


def content_hash(dataset: dict[str, RawImages], names: list[str]) -> str:
    """sha256 over every split's images and labels: changes exactly when they do."""
    digest = hashlib.sha256("\t".join(names).encode())
    for split in sorted(dataset):
        raw = dataset[split]
        digest.update(split.encode())
        digest.update(raw.pixels.tobytes())
        digest.update(raw.labels.astype("<i8").tobytes())
        digest.update("\n".join(raw.groups).encode())
    return digest.hexdigest()


def collect(data: DictConfig, seed: int, paths: Paths) -> dict:
    """Read the source, convert and check every image, and the feedback snapshot's
    labelled thumbnails (feedback.py) as a `feedback` split; write `paths.raw`
    atomically."""
    datasets.disable_progress_bars()
    root = paths.root
    if data.source not in SOURCES:
        raise CollectError(f"data.source: unknown image source {data.source!r} "
                           f"({', '.join(SOURCES)})")
    spec = source_spec(data)
    names = list(data.label_names) if data.get("label_names") else None
    if data.source == "idx":
        splits = read_idx_splits(data, spec, root)
    elif data.source == "cifar":
        splits, found = read_cifar_splits(data, spec, root)
        names = names or found
    else:
        splits, names = read_folder_splits(data, spec, root)
    if "train" not in splits:
        raise CollectError("data.splits must include a `train` split")
    if names is None:
        raise CollectError("data.label_names: an IDX source has numbered labels; name "
                           "the classes in order")
    for raw in splits.values():
        bad = np.flatnonzero((raw.labels < 0) | (raw.labels >= len(names)))
        if len(bad):
            raise CollectError(f"{raw.origin}: item {int(bad[0])} has label "
                               f"{int(raw.labels[bad[0]])}, outside data.label_names "
                               f"(0..{len(names) - 1})")

    dataset, manifest_splits = DatasetDict(), {}
    sampled = {}
    for split, raw in splits.items():
        raw, rows = sample(raw, data.get("max_rows"), seed)
        sampled[split] = raw
        dataset[split] = to_dataset(raw.pixels, raw.labels, raw.groups, rows, names)
        manifest_splits[split] = {"origin": raw.origin, "rows": len(raw.labels),
                                  "sha256": raw.sha256}
    source = OmegaConf.to_container(data, resolve=True)
    # The feedback snapshot is recorded only when there is one, so that without it
    # the manifest (and every output after it) is what it was before feedback existed.
    feedback_config = source.pop("feedback", None)
    feedback, read = read_feedback_images(feedback_config, spec, names, root)
    if feedback is not None:
        dataset["feedback"] = feedback
        source["feedback"] = feedback_config
    if read is not None:
        manifest_splits["feedback"] = read
    manifest = {
        "name": data.name,
        "source": source,
        "label_names": names,
        "image": spec.to_dict(),  # the conversion every image went through
        "splits": manifest_splits,
        "content_hash": content_hash(sampled, names),
    }
    with atomic.atomic_dir(paths.raw) as tmp:
        dataset.save_to_disk(str(tmp / "dataset"))
        atomic.write_json(tmp / "manifest.json", manifest)
    return manifest
