"""Text classification's collect: the configured source into raw Arrow splits and a
manifest.

Sources (`data.source` in conf/data/):
- `files`: local csv / tsv / jsonl / parquet files, optionally gzip-compressed;
- `hub`: a Hugging Face Hub data set id, or a local data set directory, through
  `datasets.load_dataset`.

Every row is checked on the way in (`pipeline/data/readers.py`). A missing file, a missing
column, an empty file, a missing or unknown label or bytes that are not UTF-8 stop the
stage with a `CollectError` naming the file and the row or column, and nothing is
written.

Output (`data/raw/`): a `datasets.DatasetDict` with `text` (str), `label` (ClassLabel),
`source_row` (the row's 1-based number in its file, for tracing) and, when
`data.group_column` names one, `group` (str: rows of a group never straddle two
splits), and `manifest.json`: source, label names, rows per split and a content hash.

Production feedback (`data.feedback.snapshot`, written by `pipeline/data/feedback.py`), when
the file exists, becomes one more split, `feedback`, whatever the source: the labelled
answers with `request_id` and `position` besides `source_row` (the snapshot's line), so
every row can be traced back to the answer it corrects. preprocess decides which of
them train and which are held out.
"""

from __future__ import annotations

import hashlib
import random

import datasets
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from omegaconf import DictConfig, OmegaConf

from pipeline import atomic
from pipeline.config import Paths
from pipeline.data.readers import (
    CollectError,
    FeedbackRows,
    RawSplit,
    as_label,
    read_feedback_snapshot,
    read_files,
    read_hub,
)
from pipeline.data.splits import column

__all__ = ["CollectError", "collect"]

# ---------------------------------------------------------------- labels and output


def resolve_label_names(
    data: DictConfig, splits: dict[str, RawSplit], class_names: list[str] | None
) -> tuple[list[str], dict[str, int]]:
    """Class names in order, and the map from raw label value to class index."""
    if data.labels:
        mapping = {as_label(k): str(v) for k, v in data.labels.items()}
        names = list(dict.fromkeys(mapping.values()))
        return names, {raw: names.index(name) for raw, name in mapping.items()}
    if class_names:
        return class_names, {name: i for i, name in enumerate(class_names)}
    found = set(splits["train"].labels)
    numeric = all(v.lstrip("-").isdigit() for v in found)
    names = sorted(found, key=int) if numeric else sorted(found)
    return names, {name: i for i, name in enumerate(names)}


def encode_labels(raw: RawSplit, index: dict[str, int]) -> list[int]:
    ids = []
    for label, row in zip(raw.labels, raw.rows, strict=True):
        if label not in index:
            raise CollectError(
                f"{raw.origin}, row {row}: unknown label {label!r} "
                f"(known: {', '.join(sorted(index))})"
            )
        ids.append(index[label])
    return ids


def sample_rows(raw: RawSplit, max_rows: int | None, seed: int) -> RawSplit:
    """A seeded sample of at most `max_rows` rows, kept in source order."""
    if not max_rows or len(raw.texts) <= max_rows:
        return raw
    keep = sorted(random.Random(seed).sample(range(len(raw.texts)), max_rows))
    return RawSplit(
        origin=raw.origin,
        texts=[raw.texts[i] for i in keep],
        labels=[raw.labels[i] for i in keep],
        rows=[raw.rows[i] for i in keep],
        groups=[raw.groups[i] for i in keep] if raw.groups is not None else None,
        sha256=raw.sha256,
    )


def content_hash(dataset: DatasetDict) -> str:
    """sha256 over every split's rows: changes exactly when the collected data does."""
    digest = hashlib.sha256()
    for split in sorted(dataset):
        ds = dataset[split]
        names = ds.features["label"].names
        for text, label in zip(column(ds, "text"), column(ds, "label"), strict=True):
            digest.update(f"{split}\t{names[label]}\t{text}\n".encode())
    return digest.hexdigest()


def feedback_dataset(feedback: FeedbackRows, names: list[str]) -> Dataset:
    """The `feedback` split: a label must be one of the base data's classes."""
    for label, row in zip(feedback.labels, feedback.rows, strict=True):
        if label not in names:
            raise CollectError(f"{feedback.origin}, line {row}: unknown label {label!r} "
                               f"(the data's classes: {', '.join(names)})")
    features = Features({"text": Value("string"), "label": ClassLabel(names=names),
                         "source_row": Value("int64"), "request_id": Value("string"),
                         "position": Value("int64")})
    return Dataset.from_dict({
        "text": feedback.texts, "label": [names.index(label) for label in feedback.labels],
        "source_row": feedback.rows, "request_id": feedback.request_ids,
        "position": feedback.positions}, features=features)


# conf/data/files.yaml's shipped example (data/external/example/SOURCE.md)
EXAMPLE_DIR = "data/external/example/"


def check_one_source(data: DictConfig) -> None:
    """Pointing `data.splits.train` at your files while `test` still names the shipped
    example would score your model on someone else's data: stop, and say so."""
    if data.source != "files":
        return
    example = sorted(k for k, v in data.splits.items() if str(v).startswith(EXAMPLE_DIR))
    yours = sorted(k for k, v in data.splits.items() if not str(v).startswith(EXAMPLE_DIR))
    if example and yours:
        raise CollectError(
            f"data.splits: {', '.join(yours)} read your files but {', '.join(example)} "
            f"still the shipped example ({EXAMPLE_DIR}); set "
            + " and ".join(f"data.splits.{k}" for k in example)
            + " to your files too, or drop them (~data.splits.test: test is then carved "
            "from train)")


def collect(data: DictConfig, seed: int, paths: Paths) -> dict:
    """Read the source, check it, and write `paths.raw` atomically. Relative data paths
    are read under `paths.root`. Returns the manifest."""
    datasets.disable_progress_bars()
    root = paths.root
    if "train" not in data.splits:
        raise CollectError("data.splits must include a `train` split")
    check_one_source(data)
    if data.source == "files":
        splits, class_names = read_files(data, root), None
    elif data.source == "hub":
        splits, class_names = read_hub(data)
    else:
        raise CollectError(f"data.source: unknown source {data.source!r} (files, hub)")

    names, index = resolve_label_names(data, splits, class_names)
    features = Features(
        {"text": Value("string"), "label": ClassLabel(names=names), "source_row": Value("int64")}
    )
    if data.get("group_column"):
        features["group"] = Value("string")
    dataset = DatasetDict()
    for split, raw in splits.items():
        raw = sample_rows(raw, data.max_rows, seed)
        columns = {"text": raw.texts, "label": encode_labels(raw, index), "source_row": raw.rows}
        if raw.groups is not None:
            columns["group"] = raw.groups
        dataset[split] = Dataset.from_dict(columns, features=features)

    source = OmegaConf.to_container(data, resolve=True)
    # Only a merged snapshot is part of what was collected: without one the manifest
    # (and so every output after it) is what it was before feedback existed.
    feedback_config = source.pop("feedback", None)
    feedback = read_feedback_snapshot(feedback_config, root)
    manifest_splits = {
        split: {"origin": raw.origin, "rows": dataset[split].num_rows, "sha256": raw.sha256}
        for split, raw in splits.items()
    }
    if feedback is not None:
        dataset["feedback"] = feedback_dataset(feedback, names)
        source["feedback"] = feedback_config
        manifest_splits["feedback"] = {"origin": feedback.origin, "rows": len(feedback.texts),
                                       "sha256": feedback.sha256,
                                       "relabelled_dropped": feedback.repeats}
    manifest = {
        "name": data.name,
        "source": source,
        "label_names": names,
        "splits": manifest_splits,
        "content_hash": content_hash(dataset),
    }
    with atomic.atomic_dir(paths.raw) as tmp:
        dataset.save_to_disk(str(tmp / "dataset"))
        atomic.write_json(tmp / "manifest.json", manifest)
    return manifest
