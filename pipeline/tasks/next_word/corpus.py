"""Reading a corpus as documents: plain-text files, tables with a text column, or a
Hugging Face Hub data set.

A document is the unit the splits are carved by and the one [EOS] closes: a whole
file, a blank-line block (Tiny Shakespeare's speeches) or a single line / row
(`data.document`). Tables (csv, tsv, jsonl, parquet) are read row by row through
pipeline/data/readers.py, so their quoting, JSON and encoding checks are the text
classification ones; their rows play the part of lines, a blank row ending a block.

Bad input stops with a `CollectError` naming the file and line (or the Hub split and
row): bytes that are not UTF-8, a missing text column, a file or split without a
single document, a pattern that matches no file. Files ending in `.gz` are read
through gzip. Line endings are normalised to LF and trailing spaces dropped: they are
not part of any word, and would otherwise change the content hash between a Windows
and a Unix copy of one corpus.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.data.readers import CollectError, iter_file_rows, read_text

TEXT_SUFFIXES = {"txt", "text", "md"}
TABLE_FORMATS = ("csv", "tsv", "jsonl", "parquet")
FORMATS = ("text", *TABLE_FORMATS)
DOCUMENT_RULES = ("block", "file", "row")


@dataclass
class Documents:
    """One split's documents in source order, each with the file and the 1-based line
    (or row) it starts at, for tracing a document back to its source."""

    origin: str
    texts: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    sources: int = 0  # files read (1 for a Hub split)
    sha256: str | None = None  # of the source files' bytes, in reading order

    def extend(self, found: list[tuple[int, str]], origin: str) -> None:
        for row, text in found:
            self.texts.append(text)
            self.files.append(origin)
            self.rows.append(row)

    def head(self, count: int | None) -> Documents:
        """The first `count` documents (all when None): a contiguous run, so that
        preprocess still carves its splits from neighbouring documents."""
        if count is None or len(self.texts) <= count:
            return self
        return Documents(self.origin, self.texts[:count], self.files[:count],
                         self.rows[:count], self.sources, self.sha256)


# ---------------------------------------------------------------- lines into documents


def documents(lines: Iterable[tuple[int, str]], rule: str) -> list[tuple[int, str]]:
    """(first line, text) of each document in numbered lines, by `rule`."""
    numbered = [(number, line.rstrip()) for number, line in lines]
    if rule == "row":
        return [(number, line) for number, line in numbered if line.strip()]
    if rule == "file":  # blank lines inside the file stay; those around it go
        kept = [i for i, (_, line) in enumerate(numbered) if line.strip()]
        if not kept:
            return []
        inside = numbered[kept[0]: kept[-1] + 1]
        return [(inside[0][0], "\n".join(line for _, line in inside))]
    found: list[tuple[int, str]] = []
    start, block = 0, []
    for number, line in numbered:
        if line.strip():
            start = start if block else number
            block.append(line)
        elif block:
            found.append((start, "\n".join(block)))
            block = []
    if block:
        found.append((start, "\n".join(block)))
    return found


def text_lines(text: str) -> Iterator[tuple[int, str]]:
    yield from enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"),
                         start=1)


# ---------------------------------------------------------------- files


def file_format(path: Path, data: DictConfig) -> str:
    if data.get("format"):
        if data.format not in FORMATS:
            raise CollectError(f"data.format: unknown format {data.format!r} "
                               f"({', '.join(FORMATS)})")
        return str(data.format)
    suffixes = [s.lstrip(".").lower() for s in path.suffixes if s != ".gz"]
    fmt = suffixes[-1] if suffixes else ""
    fmt = "text" if fmt in TEXT_SUFFIXES else {"json": "jsonl", "ndjson": "jsonl"}.get(fmt, fmt)
    if fmt not in FORMATS:
        raise CollectError(f"{path}: cannot tell the format from the name; set data.format "
                           f"({', '.join(FORMATS)})")
    return fmt


def table_lines(path: Path, origin: str, fmt: str, data: DictConfig
                ) -> tuple[list[tuple[int, str]], str]:
    """(line, text) of every row of a table, and the sha256 of the file's bytes."""
    settings = OmegaConf.create({"format": fmt, "header": data.get("header", True),
                                 "columns": data.get("columns")})
    column = str(data.text_column)
    try:
        rows, digest = iter_file_rows(path, settings)
        numbered = []
        for number, record in rows:
            if column not in record:
                where = "row" if fmt == "parquet" else "line"
                raise CollectError(f"{origin}, {where} {number}: no column {column!r} "
                                   f"(columns: {', '.join(map(str, record))}); set "
                                   "data.text_column")
            value = record[column]
            numbered.append((number, "" if value is None else str(value)))
    except CollectError:
        raise
    except Exception as err:  # pyarrow's and csv's own errors on a damaged file
        raise CollectError(f"{origin}: cannot read it as {fmt} ({err})") from None
    return numbered, digest


def read_file(path: Path, origin: str, data: DictConfig) -> tuple[list[tuple[int, str]], str]:
    """The documents of one file, and the sha256 of its bytes."""
    fmt = file_format(path, data)
    if fmt == "text":
        text, digest = read_text(path)
        lines = list(text_lines(text))
    else:
        if data.document == "file":
            raise CollectError(f"data.document: `file` takes text files; {origin} is {fmt} "
                               "(use block or row)")
        lines, digest = table_lines(path, origin, fmt, data)
    found = documents(lines, str(data.document))
    if not found:
        raise CollectError(f"{origin}: empty file (no documents in its {len(lines)} "
                           f"{'lines' if fmt != 'parquet' else 'rows'}, all blank)")
    return found, digest


def matching_files(pattern: str, root: Path, split: str) -> list[tuple[Path, str]]:
    """(path, name as configured) of every file `pattern` names, in sorted order."""
    if not glob.has_magic(pattern):
        return [(root / pattern, pattern)]
    found = sorted(p for p in root.glob(pattern) if p.is_file())
    if not found:
        raise CollectError(f"data.splits.{split}: no file matches {pattern!r}")
    return [(p, str(p.relative_to(root))) for p in found]


def read_files(data: DictConfig, root: Path) -> dict[str, Documents]:
    splits = {}
    for split, pattern in data.splits.items():
        docs = Documents(origin=str(pattern))
        digest = hashlib.sha256()
        for path, origin in matching_files(str(pattern), root, split):
            found, file_digest = read_file(path, origin, data)
            docs.extend(found, origin)
            docs.sources += 1
            digest.update(f"{origin}\t{file_digest}\n".encode())
        docs.sha256 = digest.hexdigest()
        splits[split] = docs
    return splits


# ---------------------------------------------------------------- the Hub


def read_hub(data: DictConfig) -> dict[str, Documents]:
    """Through `datasets.load_dataset`: a Hub id or a local data set directory; our
    split names map to the data set's own in `data.splits`."""
    from datasets import load_dataset

    if not data.get("path"):
        raise CollectError("data.path: the Hub data set id (or a local data set directory)")
    try:
        loaded = load_dataset(data.path, name=data.get("config_name"),
                              revision=data.get("revision"))
    except Exception as err:  # the library raises many types; all mean "cannot load"
        raise CollectError(f"{data.path}: cannot load the data set ({err})") from err
    column = str(data.text_column)
    splits = {}
    for split, theirs in data.splits.items():
        if theirs not in loaded:
            raise CollectError(f"{data.path}: no split {theirs!r} (splits: {', '.join(loaded)})")
        ds, origin = loaded[theirs], f"{data.path}[{theirs}]"
        if column not in ds.column_names:
            raise CollectError(f"{origin}: no column {column!r} (columns: "
                               f"{', '.join(ds.column_names)}); set data.text_column")
        values = ds.with_format("arrow")[column].to_pylist()
        rows = [(i, "" if v is None else str(v)) for i, v in enumerate(values, start=1)]
        found = documents(rows, "row" if data.document == "row" else "block")
        if not found:
            raise CollectError(f"{origin}: no documents (its {len(rows)} rows are blank)")
        docs = Documents(origin=origin, sources=1)
        docs.extend(found, origin)
        splits[split] = docs
    return splits


def read_corpus(data: DictConfig, root: Path) -> dict[str, Documents]:
    """Every configured split's documents, checked."""
    if data.get("document") not in DOCUMENT_RULES:
        raise CollectError(f"data.document: unknown rule {data.get('document')!r} "
                           f"({', '.join(DOCUMENT_RULES)})")
    if not data.get("text_column") and data.source == "hub":
        raise CollectError("data.text_column: the column holding the text")
    if data.source == "files":
        return read_files(data, root)
    if data.source == "hub":
        return read_hub(data)
    raise CollectError(f"data.source: unknown source {data.source!r} (files, hub)")
