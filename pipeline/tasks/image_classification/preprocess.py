"""preprocess for images: split by group under the leakage rule, fit the image spec,
profile every split.

- Groups: the manifest's `group` column where the source names one; otherwise each
  training image's near-duplicate cluster (duplicates.py), so copies of one picture
  never straddle train and validation.
- Held-out splits the source lacks are carved from train by whole groups, stratified
  by label (`pipeline.data.grouping.draw_groups`, as for text).
- Leakage: validation and test images that equal or near-duplicate a training image
  are counted with an example pair and bounded by `validation.max_leakage`.
- Production feedback (collect's `feedback` split: labelled thumbnails) joins train,
  but for a slice held out as `feedback_test` (feedback.py's rule).
- `image_spec.json`: the conversion policy collect applied plus the training split's
  per-channel mean and std; the bundle carries it and the service normalises uploads
  with it (serving/bundle/images.py), the very function the training batches go
  through. The splits keep the converted uint8 pixels (a quarter of float32's bytes,
  the same bytes in every run); normalising is that one function, never a copy.
"""

from __future__ import annotations

from collections import Counter

import datasets
import numpy as np
from datasets import DatasetDict
from omegaconf import DictConfig

from pipeline import atomic
from pipeline.config import Paths
from pipeline.data.grouping import draw_groups
from pipeline.data.profile import ValidationError, reference_histogram
from pipeline.data.splits import FEEDBACK_TEST, column, load_dataset_dir
from pipeline.tasks.image_classification import duplicates
from pipeline.tasks.image_classification.arrays import pixels
from pipeline.tasks.image_classification.feedback import merge_feedback
from serving.bundle.images import ImageSpec, brightness_contrast, channel_stats

SPEC_FILE = "image_spec.json"


def train_groups(train: datasets.Dataset, images: np.ndarray, hashes: np.ndarray,
                 cfg: DictConfig) -> tuple[list[str], str]:
    """Each training image's group and where the groups came from."""
    given = column(train, "group")
    if any(given):
        return [g or f"row:{i}" for i, g in enumerate(given)], "data.group_column"
    return (duplicates.clusters(images, hashes, cfg.near_duplicate_distance,
                                cfg.near_duplicate_pixel_diff), "near-duplicate clusters")


def carve(groups: list[str], labels: list[int], fraction: float, seed: int
          ) -> tuple[list[int], list[int]]:
    """(held out, kept) row indices: about `fraction` of the groups, by label."""
    roots: dict[str, int] = {}
    for i, group in enumerate(groups):
        roots.setdefault(group, i)
    drawn = draw_groups(groups, roots, labels, fraction, seed)
    held = [i for i, g in enumerate(groups) if g in drawn]
    kept = [i for i, g in enumerate(groups) if g not in drawn]
    return held, kept


def split_train(raw: DatasetDict, images: np.ndarray, hashes: np.ndarray, cfg: DictConfig,
                seed: int) -> tuple[dict[str, list[int]], dict]:
    groups, origin = train_groups(raw["train"], images, hashes, cfg)
    labels = column(raw["train"], "label")
    sizes = Counter(groups)
    report = {"groups": len(sizes), "groups_from": origin,
              "largest_group": max(sizes.values()),
              "images_in_shared_groups": sum(n for n in sizes.values() if n > 1)}
    rest = list(range(len(groups)))
    indices = {}
    for name, fraction in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):
        if name in raw:
            continue
        held, kept = carve([groups[i] for i in rest], [labels[i] for i in rest],
                           fraction, seed)
        indices[name] = [rest[i] for i in held]
        rest = [rest[i] for i in kept]
    indices["train"] = rest
    return indices, report


def split_profile(images: np.ndarray, labels: list[int], label_names: list[str]) -> dict:
    counts = Counter(labels)
    rows = len(labels)
    brightness, contrast = brightness_contrast(images) if rows else (np.zeros(0),) * 2
    return {
        "rows": rows,
        "class_counts": {name: counts.get(i, 0) for i, name in enumerate(label_names)},
        "class_shares": {name: counts.get(i, 0) / max(rows, 1)
                         for i, name in enumerate(label_names)},
        "brightness": {"mean": float(brightness.mean()) if rows else 0.0,
                       "std": float(brightness.std()) if rows else 0.0},
        "contrast": {"mean": float(contrast.mean()) if rows else 0.0,
                     "std": float(contrast.std()) if rows else 0.0},
    }


def validate(profile: dict, cfg: DictConfig) -> None:
    """ValidationError listing every configured anomaly found."""
    problems = []
    for name, split in profile["splits"].items():
        if name == FEEDBACK_TEST:  # whatever production sent: no minimum per class
            continue
        if split["rows"] == 0:
            problems.append(f"split {name!r} is empty")
            continue
        problems += [f"split {name!r}: class {label!r} has {count} images (minimum "
                     f"{cfg.validation.min_rows_per_class})"
                     for label, count in split["class_counts"].items()
                     if count < cfg.validation.min_rows_per_class]
    for name, found in profile["leakage"].items():
        if found["share"] > cfg.validation.max_leakage:
            example = found["example"]
            problems.append(
                f"split {name!r}: {found['share']:.1%} of its images ({found['leaked']} of "
                f"{found['rows']}: {found['equal']} equal, {found['near_duplicate']} "
                f"near-duplicate) repeat a training image, over the bound "
                f"{cfg.validation.max_leakage:.1%}; e.g. source row {example['source_row']} "
                f"and training source row {example['train_source_row']}")
    if problems:
        raise ValidationError("; ".join(problems))


def preprocess(cfg: DictConfig, seed: int, paths: Paths) -> dict:
    """Run the stage on `paths.raw`; write `paths.processed` atomically, only if the
    profile passes validation."""
    datasets.disable_progress_bars()
    raw = load_dataset_dir(paths.raw / "dataset")
    manifest = atomic.read_json(paths.raw / "manifest.json")
    label_names = raw["train"].features["label"].names
    train_images = pixels(raw["train"])
    train_hashes = duplicates.phashes(train_images)
    indices, splitting = split_train(raw, train_images, train_hashes, cfg, seed)
    splits = DatasetDict({name: raw["train"].select(indices[name]) if name in indices
                          else raw[name] for name in ("train", "val", "test")})
    arrays = {name: pixels(ds) for name, ds in splits.items()}
    hashes = {"train": train_hashes[indices["train"]]}
    leakage = {}
    for name in ("val", "test"):
        hashes[name] = (train_hashes[indices[name]] if name in indices
                        else duplicates.phashes(arrays[name]))
        found = duplicates.leakage(arrays[name], hashes[name], arrays["train"],
                                   hashes["train"], cfg.near_duplicate_distance,
                                   cfg.near_duplicate_pixel_diff)
        if found["example"]:  # rows of the source, which a user can look up
            found["example"]["source_row"] = column(splits[name], "source_row")[
                found["example"]["row"]]
            found["example"]["train_source_row"] = column(splits["train"], "source_row")[
                found["example"]["train_row"]]
        leakage[name] = found
    feedback = None
    if "feedback" in raw:
        splits, feedback = merge_feedback(raw["feedback"], splits, arrays, hashes, cfg, seed)
        arrays = {name: pixels(ds) for name, ds in splits.items()}

    spec = ImageSpec.from_dict(manifest["image"]).with_stats(*channel_stats(arrays["train"]))
    brightness, contrast = brightness_contrast(arrays["train"])
    train_labels = column(splits["train"], "label")
    counts = Counter(train_labels)
    profile = {
        "data": {"name": manifest["name"], "content_hash": manifest["content_hash"]},
        "label_names": label_names,
        "image": spec.to_dict(),
        "splits": {name: split_profile(arrays[name], column(ds, "label"), label_names)
                   for name, ds in splits.items()},
        "splitting": splitting,
        "leakage": leakage,
        **({"feedback": feedback} if feedback else {}),
        # What the service compares live traffic with (drift): train-split distributions.
        "reference": {
            "brightness": reference_histogram(brightness),
            "contrast": reference_histogram(contrast),
            "class_shares": [counts.get(i, 0) / len(train_labels)
                             for i in range(len(label_names))],
        },
    }
    validate(profile, cfg)
    with atomic.atomic_dir(paths.processed) as tmp:
        splits.save_to_disk(str(tmp / "dataset"))
        atomic.write_json(tmp / SPEC_FILE, spec.to_dict())
        atomic.write_json(tmp / "profile.json", profile)
    return profile
