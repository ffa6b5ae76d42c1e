"""Batch prediction over image files, for an image bundle: a folder of images, or a
table (csv, tsv, jsonl, parquet) with a column of image paths.

The parent process only lists paths: `ImageFolderReader` walks a folder (registered
for directories through `register_reader`), and a table is read by the ordinary
readers, its paths taken relative to the table's directory. The worker processes read
and decode the files (`score_files`), so the parent never holds pixels, and a file that
cannot be read or decoded (not an image, truncated, over the bundle's pixel limit) is
marked bad by path instead of stopping its chunk. The model sees what the service's
/predict gives it for the same bytes: the bundle's own decoding, spec and `infer`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.batch.pool import worker_bundle
from serving.batch.readers import (
    DIRECTORY,
    NOT_UTF8,
    BatchError,
    Record,
    RowReader,
    register_reader,
    undecodable,
)
from serving.bundle.images import ImageError
from serving.bundle.tasks import task_of
from serving.engine.inference import infer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp")
PATH_COLUMNS = ("path", "file")  # a table's image column, when none is named
FOLDER_COLUMN = "path"  # the field a folder's records hold: the path inside the folder


def image_files(folder: Path) -> list[str]:
    """Image files under `folder` (any depth), as posix paths relative to it, sorted;
    hidden files and folders (a leading dot: .git, .ipynb_checkpoints) are left out."""
    def unlistable(err: OSError) -> None:
        # os.walk skips a folder it cannot list unless told otherwise: its images
        # would be missing from the output without a word
        raise BatchError(f"{err.filename}: cannot list the folder ({err.strerror})")

    found = []
    for root, dirs, files in os.walk(folder, onerror=unlistable):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        inside = Path(root).relative_to(folder)
        found += [(inside / name).as_posix() for name in files
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


class ImageFolderReader:
    """A folder's image files, one record each, `{"path": <path inside the folder>}`,
    in sorted path order. Listed up front (sorting needs the whole list), which also
    gives the progress bar its total."""

    items = "images"  # records name image files, numbered by position, not by line

    def __init__(self, path: Path):
        self.path = path
        self.files = image_files(path)
        if not self.files:
            raise BatchError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in "
                             "the folder or below it")
        self.total_rows = len(self.files)
        self.done = 0

    def columns(self) -> list[str]:
        return [FOLDER_COLUMN]

    def records(self) -> Iterator[Record]:
        for number, name in enumerate(self.files, start=1):
            self.done = number
            yield Record(number, {FOLDER_COLUMN: name})

    def fraction_read(self) -> float | None:
        return self.done / self.total_rows

    def close(self) -> None:
        pass


def holds_images(reader: RowReader) -> bool:
    """True for a reader of image files themselves (a folder), not of a table."""
    return getattr(reader, "items", None) == "images"


def bundle_takes_images(reader: RowReader, meta: dict, identity: str) -> bool:
    """True for an image bundle; BatchError for a folder of images and a text bundle."""
    images = task_of(meta).items == "images"
    if holds_images(reader) and not images:
        raise BatchError(f"{reader.path}: a folder of images, but the bundle {identity} "
                         "classifies texts: give it a csv, tsv, jsonl or parquet file of "
                         "texts, or an image bundle")
    return images


def choose_path_column(path: Path, columns: list[str], requested: str | None) -> str:
    """The column of image paths; BatchError naming the columns found when none fits."""
    found = ", ".join(map(repr, columns)) or "none"
    if requested is not None:
        if requested not in columns:
            raise BatchError(f"{path}: no column {requested!r} (columns: {found})")
        return requested
    for name in PATH_COLUMNS:
        if name in columns:
            return name
    raise BatchError(f"{path}: the bundle classifies images, and this file has no column "
                     f"of image paths: looked for {', '.join(PATH_COLUMNS)} (columns: "
                     f"{found}); name it with column=... (--column), or give a folder of "
                     "images")


def path_of(fields: dict, name: str) -> tuple[str | None, str | None]:
    """(path as written, None), or (None, why this row names no image file)."""
    if name not in fields:
        return None, f"no {name!r} field"
    value = fields[name]
    if value is None:
        return None, f"missing image path in {name!r}"
    if not isinstance(value, str):
        return None, f"{name!r} is {type(value).__name__}, not a path"
    if not value.strip():
        return None, f"empty image path in {name!r}"
    if undecodable([value]):
        return None, NOT_UTF8
    if "\0" in value:  # no file system takes it; open() would raise ValueError
        return None, f"a NUL character in the path in {name!r}"
    return value, None


def with_image_files(reader: RowReader, column: str | None
                     ) -> Iterator[tuple[Record, str | None]]:
    """Each record with the absolute path of its image file (`record.item` set to the
    path as reported), or with its problem set and no path."""
    folder = holds_images(reader)
    shown = reader.path if folder else reader.path.parent  # paths are relative to it
    base = shown.absolute()
    columns = reader.columns()
    name = choose_path_column(reader.path, columns, column) if columns else None
    for record in reader.records():
        if record.fields is None:
            yield record, None
            continue
        if name is None:  # JSON lines: the first object's fields decide
            name = choose_path_column(reader.path, list(record.fields), column)
        value, record.problem = path_of(record.fields, name)
        if value is not None:
            record.item = str(shown / value)
        yield record, None if value is None else str(base / value)


@dataclass
class Scored:
    """A chunk of image files scored in a worker."""

    probs: np.ndarray  # float32 [files that were images, classes], in the chunk's order
    problems: dict[int, str]  # position in the chunk's files -> why it is not an image


def score_files(files: list[str]) -> Scored:
    """Read and decode each file by the bundle's spec, then score the images as the
    service scores a request's (one batch through `infer`); runs in a worker process."""
    bundle = worker_bundle()
    pixels, problems = [], {}
    for i, file in enumerate(files):
        try:
            pixels.append(bundle.inputs.pixels([Path(file).read_bytes()])[0])
        except ImageError as err:
            problems[i] = err.reason
        except OSError as err:  # missing, a folder, no permission
            problems[i] = f"cannot read the file ({err.strerror or err})"
    if not pixels:
        return Scored(np.empty((0, len(bundle.label_names)), np.float32), problems)
    probs, _ = infer(bundle, pixels)
    return Scored(probs, problems)


def marked(records: list[Record], scored: Scored) -> np.ndarray:
    """The probabilities of a chunk's images, once the files that were not images have
    their records' problem set (the records sent were those without one, in order)."""
    sent = [record for record in records if not record.problem]
    for index, reason in scored.problems.items():
        sent[index].problem = reason
    return scored.probs


register_reader("image-folder", (DIRECTORY,), ImageFolderReader)
