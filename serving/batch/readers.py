"""Input files read row by row, in bounded memory: csv, tsv and jsonl (each also
gzip-compressed, `.csv.gz`) and parquet, the format told by the file name.

A reader yields `Record`s in file order: the row's line number (for parquet, its row
number), its fields, or why the line is not a row (malformed JSON, a wrong count of
fields, bytes that are not UTF-8), so that the caller reports it by line instead of
skipping it. Another kind of input is one more reader, registered for a suffix, or
for folders under `DIRECTORY`: `register_reader("image-folder", (DIRECTORY,), ...)`
(serving/batch/images.py). A reader whose records are the image files themselves says
so with `items = "images"`: its rows are then reported by path, not by line.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class BatchError(ValueError):
    """Input, output or model that a batch run cannot use; the message names the file."""


@dataclass
class Record:
    line: int  # 1-based line in the file (row number for parquet)
    fields: dict | None  # None: not a row; `problem` says why
    problem: str | None = None
    item: str | None = None  # the file the row names (an image), reported instead of line


class RowReader(Protocol):
    """What the batch runner needs of an input, whatever its kind."""

    path: Path
    total_rows: int | None  # when the file says so up front (parquet); else None

    def columns(self) -> list[str] | None:
        """The column names, when known before reading the rows (a header, a schema)."""

    def records(self) -> Iterator[Record]: ...

    def fraction_read(self) -> float | None:
        """How far through the file reading is (0 to 1), for an ETA; None: unknown."""

    def close(self) -> None: ...


READERS: dict[str, Callable[[Path], RowReader]] = {}
SUFFIXES: dict[str, str] = {}  # file suffix (no dot) -> reader format
DIRECTORY = "/"  # the "suffix" of a folder: no file name's suffix holds a slash


def register_reader(fmt: str, suffixes: tuple[str, ...],
                    factory: Callable[[Path], RowReader]) -> None:
    READERS[fmt] = factory
    SUFFIXES.update({suffix: fmt for suffix in suffixes})


def input_format(path: Path) -> str:
    suffixes = [s.lstrip(".").lower() for s in path.suffixes if s.lower() != ".gz"]
    fmt = SUFFIXES.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        named = ", ".join("." + s for s in SUFFIXES if s != DIRECTORY)
        folder = ", or a folder" if DIRECTORY in SUFFIXES else ""
        raise BatchError(f"{path}: cannot tell the input format from the name; expected "
                         f"one of {named} (optionally .gz){folder}")
    return fmt


def open_reader(path: Path) -> RowReader:
    path = Path(path)
    if path.is_dir():  # a folder is told by what it is, whatever dots its name has
        if DIRECTORY not in SUFFIXES:
            raise BatchError(f"{path}: a folder; expected a file")
        return READERS[SUFFIXES[DIRECTORY]](path)
    fmt = input_format(path)
    if not path.exists():
        raise BatchError(f"{path}: no such file")
    return READERS[fmt](path)


def undecodable(values) -> bool:
    """True when a value holds bytes that were not UTF-8 (read as lone surrogates)."""
    for value in values:
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


NOT_UTF8 = "bytes that are not UTF-8"


class TextFile:
    """A text file, gzip-compressed or not, read as a stream: bytes that are not UTF-8
    come through as lone surrogates (errors='surrogateescape'), so one bad line is
    reported as a bad row instead of ending the run."""

    def __init__(self, path: Path, newline: str):
        self.path = path
        self.total_rows = None
        self.size = os.path.getsize(path)
        self.raw = open(path, "rb")  # noqa: SIM115 - closed by close()
        stream = gzip.GzipFile(fileobj=self.raw) if path.suffix.lower() == ".gz" else self.raw
        self.text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape",
                                     newline=newline)

    def fraction_read(self) -> float | None:
        # the compressed bytes consumed, for a gzip file: what the file size counts
        return self.raw.tell() / self.size if self.size else None

    def close(self) -> None:
        self.text.close()
        self.raw.close()


class DelimitedReader(TextFile):
    """csv (RFC 4180 quoting) or tsv. TSV is read unquoted, as the pipeline reads SST-2:
    a stray quote character must not swallow the lines that follow it."""

    def __init__(self, path: Path, delimiter: str):
        super().__init__(path, newline="")  # csv handles line ends inside quoted fields
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        self.reader = csv.reader(self.text, delimiter=delimiter, quoting=quoting)
        try:
            self.header = next(self.reader, None)
        except csv.Error as err:
            raise BatchError(f"{path}:1: cannot read the header ({err})") from None
        if not self.header:
            raise BatchError(f"{path}: empty file (no header line)")

    def columns(self) -> list[str]:
        return list(self.header)

    def records(self) -> Iterator[Record]:
        names, width = self.header, len(self.header)
        while True:
            line = self.reader.line_num + 1  # where the row starts, if it spans lines
            try:
                values = next(self.reader)
            except StopIteration:
                return
            except csv.Error as err:  # e.g. a field over csv's size limit
                yield Record(line, None, str(err))
                continue
            if not values:
                yield Record(line, None, "blank line")
            elif len(values) != width:
                yield Record(line, None, f"{len(values)} fields, expected {width}")
            elif undecodable(values):
                yield Record(line, None, NOT_UTF8)
            else:
                yield Record(line, dict(zip(names, values, strict=True)))


class JsonlReader(TextFile):
    """One JSON object per line; only a newline ends a line (a JSON string may hold
    U+2028 and the like, which str.splitlines would split at)."""

    def __init__(self, path: Path):
        super().__init__(path, newline="\n")

    def columns(self) -> None:
        return None  # each object names its own fields

    def records(self) -> Iterator[Record]:
        for number, line in enumerate(self.text, start=1):
            if not line.strip():
                yield Record(number, None, "blank line")
                continue
            if undecodable([line]):
                yield Record(number, None, NOT_UTF8)
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                yield Record(number, None, f"invalid JSON ({err.msg}, column {err.colno})")
                continue
            if isinstance(value, dict):
                yield Record(number, value)
            else:
                yield Record(number, None, f"expected a JSON object, got {type(value).__name__}")


def pyarrow_for(path: Path, doing: str):
    """pyarrow.parquet, imported only for parquet files: the serving image leaves
    pyarrow out, so its absence is a BatchError naming the file."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BatchError(f"{path}: {doing} parquet needs pyarrow (pip install pyarrow), "
                         "which the serving image leaves out") from None
    return pq


class ParquetReader:
    """Parquet, read a row group slice at a time (pyarrow's iter_batches)."""

    BATCH_ROWS = 4096

    def __init__(self, path: Path):
        pq = pyarrow_for(path, "reading")
        self.path = path
        try:
            self.file = pq.ParquetFile(path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError...
            raise BatchError(f"{path}: not a readable parquet file ({err})") from None
        self.total_rows = self.file.metadata.num_rows
        self.done = 0

    def columns(self) -> list[str]:
        return list(self.file.schema_arrow.names)

    def records(self) -> Iterator[Record]:
        for batch in self.file.iter_batches(batch_size=self.BATCH_ROWS):
            for row in batch.to_pylist():
                self.done += 1
                yield Record(self.done, row)

    def fraction_read(self) -> float | None:
        return self.done / self.total_rows if self.total_rows else None

    def close(self) -> None:
        self.file.close()


register_reader("csv", ("csv",), lambda path: DelimitedReader(path, ","))
register_reader("tsv", ("tsv", "tab"), lambda path: DelimitedReader(path, "\t"))
register_reader("jsonl", ("jsonl", "ndjson"), JsonlReader)
register_reader("parquet", ("parquet", "pq"), ParquetReader)
