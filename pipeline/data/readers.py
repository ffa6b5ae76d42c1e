"""Reading a source row by row: local files (csv, tsv, jsonl, parquet, gzip too) or a
Hugging Face Hub data set, each row checked on the way in.

A missing file, a missing column (text, label or `data.group_column`), an empty file,
a missing label or bytes that are not UTF-8 raise `CollectError`, naming the file
and the row or column. What comes out is one `RawSplit` per split, in source order.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from datasets import ClassLabel
from omegaconf import DictConfig, OmegaConf

FORMATS = ("csv", "tsv", "jsonl", "parquet")


class CollectError(ValueError):
    """Bad input: the message names the file and the row or column."""


@dataclass
class RawSplit:
    """One split as read: where it came from, and its rows in source order."""

    origin: str
    texts: list[str]
    labels: list[str]  # raw label values, as strings
    rows: list[int]  # 1-based row numbers in the source
    groups: list[str] | None = None  # `data.group_column`'s values, when one is set
    sha256: str | None = None  # of the source file's bytes, when it is a file


# ---------------------------------------------------------------- reading files


def infer_format(path: Path) -> str:
    suffixes = [s.lstrip(".") for s in path.suffixes if s != ".gz"]
    fmt = suffixes[-1] if suffixes else ""
    fmt = {"jsonl": "jsonl", "json": "jsonl", "ndjson": "jsonl", "txt": "tsv"}.get(fmt, fmt)
    if fmt not in FORMATS:
        raise CollectError(f"{path}: cannot tell the format from the name; set data.format")
    return fmt


def read_text(path: Path) -> tuple[str, str]:
    """The file decoded as UTF-8, and the sha256 of its bytes."""
    if not path.is_file():
        raise CollectError(f"{path}: file not found")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8"), digest
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise CollectError(
            f"{path}, line {line}: bytes that are not UTF-8 ({data[err.start:err.end]!r})"
        ) from None


def iter_delimited(
    text: str, path: Path, delimiter: str, header: bool, columns: list[str] | None
) -> Iterator[tuple[int, dict]]:
    # SST-2 and similar files are written without quoting: QUOTE_NONE keeps a stray
    # quote character from swallowing the following lines.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(text.splitlines(), delimiter=delimiter, quoting=quoting)
    if header:
        names = next(reader, None)
        if names is None:
            raise CollectError(f"{path}: empty file")
    elif columns:
        names = list(columns)
    else:
        raise CollectError(f"{path}: data.header is false, so data.columns must name the columns")
    for values in reader:
        if not values:
            continue  # blank line
        if len(values) != len(names):
            raise CollectError(
                f"{path}, line {reader.line_num}: {len(values)} fields, expected {len(names)}"
            )
        yield reader.line_num, dict(zip(names, values, strict=True))


def iter_jsonl(text: str, path: Path) -> Iterator[tuple[int, dict]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CollectError(f"{path}, line {number}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise CollectError(f"{path}, line {number}: expected a JSON object")
        yield number, record


def iter_file_rows(path: Path, data: DictConfig) -> tuple[Iterator[tuple[int, dict]], str]:
    fmt = data.format or infer_format(path)
    if fmt == "parquet":
        if not path.is_file():
            raise CollectError(f"{path}: file not found")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        records = pq.read_table(path).to_pylist()
        return enumerate(records, start=1), digest
    text, digest = read_text(path)
    if fmt == "jsonl":
        return iter_jsonl(text, path), digest
    delimiter = "\t" if fmt == "tsv" else ","
    columns = OmegaConf.to_container(data.columns) if data.columns else None
    return iter_delimited(text, path, delimiter, data.header, columns), digest


def as_label(value: object) -> str:
    """Raw labels compare as strings, so `1`, `"1"` and a CSV's 1 are the same class."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def collect_rows(rows: Iterator[tuple[int, dict]], origin: str, data: DictConfig) -> RawSplit:
    """Pick the text and label out of each row, checking columns and labels are present."""
    # Plain locals: OmegaConf attribute access is slow enough to dominate this loop.
    text_columns, label_column = list(data.text_columns), str(data.label_column)
    group_column = data.get("group_column")
    texts, labels, numbers, groups = [], [], [], []
    required = [*text_columns, label_column, *([group_column] if group_column else [])]
    for number, record in rows:
        for name in required:
            if name not in record:
                raise CollectError(
                    f"{origin}, row {number}: no column {name!r} "
                    f"(columns: {', '.join(map(str, record))})"
                )
        label = as_label(record[label_column])
        if not label:
            raise CollectError(f"{origin}, row {number}: missing label in {label_column!r}")
        parts = [record[c] for c in text_columns]
        texts.append(" ".join(str(p) for p in parts if p is not None))
        labels.append(label)
        numbers.append(number)
        if group_column:
            groups.append(as_label(record[group_column]))
    if not texts:
        raise CollectError(f"{origin}: empty file (no data rows)")
    return RawSplit(origin=origin, texts=texts, labels=labels, rows=numbers,
                    groups=groups if group_column else None)


def read_files(data: DictConfig, root: Path) -> dict[str, RawSplit]:
    splits = {}
    for split, relpath in data.splits.items():
        path = root / relpath
        rows, digest = iter_file_rows(path, data)
        raw = collect_rows(rows, str(relpath), data)
        raw.sha256 = digest
        splits[split] = raw
    return splits


# ---------------------------------------------------------------- reading the Hub


def read_hub(data: DictConfig) -> tuple[dict[str, RawSplit], list[str] | None]:
    """Load through `datasets.load_dataset`; a ClassLabel feature supplies the names."""
    from datasets import load_dataset

    try:
        loaded = load_dataset(data.path, name=data.config_name, revision=data.revision)
    except Exception as err:  # the library raises many types; all mean "cannot load"
        raise CollectError(f"{data.path}: cannot load the data set ({err})") from err
    splits, class_names = {}, None
    for split, their_split in data.splits.items():
        if their_split not in loaded:
            raise CollectError(
                f"{data.path}: no split {their_split!r} (splits: {', '.join(loaded)})"
            )
        ds = loaded[their_split]
        origin = f"{data.path}[{their_split}]"
        if data.label_column not in ds.column_names:
            raise CollectError(
                f"{origin}: no column {data.label_column!r} (columns: {', '.join(ds.column_names)})"
            )
        raw = collect_rows(enumerate(ds, start=1), origin, data)
        feature = ds.features[data.label_column]
        if isinstance(feature, ClassLabel):
            class_names = list(feature.names)
            raw.labels = [class_name(feature, value, origin, row)
                          for value, row in zip(raw.labels, raw.rows, strict=True)]
        splits[split] = raw
    return splits, class_names


def class_name(feature: ClassLabel, value: str, origin: str, row: int) -> str:
    """A ClassLabel index as its name; -1 is how the Hub marks an unlabelled row."""
    index = int(value)
    if not 0 <= index < feature.num_classes:
        raise CollectError(f"{origin}, row {row}: missing label (class index {index})")
    return feature.names[index]


# ---------------------------------------------------------------- production feedback

FEEDBACK_FIELDS = ("request_id", "position", "text", "label", "created")


@dataclass
class FeedbackRows:
    """Labelled answers of the prediction log, as `pipeline.data.feedback` snapshot them:
    one per distinct served text, its latest label kept."""

    origin: str
    texts: list[str]
    labels: list[str]  # class names, as the service answers them
    rows: list[int]  # 1-based line numbers in the snapshot
    request_ids: list[str]
    positions: list[int]
    sha256: str
    repeats: int  # earlier labels of a text labelled again, dropped


def read_feedback(path: Path) -> FeedbackRows:
    """Read a snapshot, checking every line's fields. A text labelled more than once
    (in one request or several) keeps its latest label: a correction replaces the
    mistake it corrects."""
    text, digest = read_text(path)
    latest: dict[str, tuple[float, int, dict]] = {}
    lines = 0
    for number, record in iter_jsonl(text, path):
        lines += 1
        for field in FEEDBACK_FIELDS:
            if record.get(field) in (None, ""):
                raise CollectError(f"{path}, line {number}: missing field {field!r}")
        if not isinstance(record["text"], str):
            raise CollectError(f"{path}, line {number}: field 'text' is not a string")
        try:
            created = float(record["created"])
        except (TypeError, ValueError):
            raise CollectError(f"{path}, line {number}: field 'created' is not a "
                               f"time ({record['created']!r})") from None
        previous = latest.get(record["text"])
        if previous is None or (created, number) >= previous[:2]:
            latest[record["text"]] = (created, number, record)
    kept = sorted(latest.values(), key=lambda found: found[1])  # snapshot order
    return FeedbackRows(
        origin=str(path), texts=[r["text"] for _, _, r in kept],
        labels=[as_label(r["label"]) for _, _, r in kept], rows=[n for _, n, _ in kept],
        request_ids=[str(r["request_id"]) for _, _, r in kept],
        positions=[int(r["position"]) for _, _, r in kept], sha256=digest,
        repeats=lines - len(kept))


def read_feedback_snapshot(config: dict | None, root: Path) -> FeedbackRows | None:
    """The feedback snapshot (`data.feedback`) when one is configured and written and
    holds rows, else None: no feedback exported yet, the base data alone."""
    if not config or not config.get("snapshot"):
        return None
    path = root / config["snapshot"]
    if not path.exists():
        return None
    feedback = read_feedback(path)
    return feedback if feedback.texts else None
