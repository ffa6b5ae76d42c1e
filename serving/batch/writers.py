"""Output files written as rows arrive, atomically: csv, tsv, jsonl (each also
gzip-compressed) or parquet, the format told by the file name.

Everything goes to a temporary file beside the output, renamed over it only when the
run succeeds (`AtomicOutput`): a failed or interrupted run leaves no partial output,
and an earlier output stays whole until the new one replaces it.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import secrets
from pathlib import Path

from serving.batch.readers import BatchError, pyarrow_for

log = logging.getLogger("serving.batch")

WRITE_FORMATS = {"csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "ndjson": "jsonl",
                 "parquet": "parquet", "pq": "parquet"}


def output_format(path: Path) -> str:
    suffixes = [s.lstrip(".").lower() for s in path.suffixes]
    compressed = suffixes[-1:] == ["gz"]
    if compressed:
        suffixes = suffixes[:-1]
    fmt = WRITE_FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None or (compressed and fmt == "parquet"):
        raise BatchError(f"{path}: cannot tell the output format from the name; expected "
                         ".csv, .tsv, .jsonl (each optionally .gz) or .parquet")
    return fmt


def as_cell(value) -> object:
    """A field for a delimited file: nested values as JSON, not Python's repr."""
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, default=str)
    return value


class DelimitedWriter:
    """The columns are the first row's; a later row's other fields (JSON lines need not
    agree) are left out, with a warning naming them."""

    def __init__(self, file, delimiter: str):
        self.file, self.delimiter, self.writer = file, delimiter, None
        self.warned: set[str] = set()

    def write(self, rows: list[dict]) -> None:
        if self.writer is None:
            # TSV is written as it is read (serving/batch/readers.py): unquoted
            quoting = csv.QUOTE_NONE if self.delimiter == "\t" else csv.QUOTE_MINIMAL
            self.writer = csv.DictWriter(
                self.file, fieldnames=list(rows[0]), restval="", extrasaction="ignore",
                delimiter=self.delimiter, lineterminator="\n", quoting=quoting,
                quotechar=None if quoting == csv.QUOTE_NONE else '"')
            self.writer.writeheader()
        known = self.writer.fieldnames
        for row in rows:
            extra = [key for key in row if key not in known and key not in self.warned]
            if extra:
                self.warned.update(extra)
                log.warning("fields %s are not in the first row's columns: left out",
                            ", ".join(map(repr, extra)))
            cells = {key: as_cell(value) for key, value in row.items()}
            if self.delimiter == "\t":  # unquoted TSV cannot hold a tab or a line break
                cells = {key: " ".join(value.splitlines()).replace("\t", " ")
                         if isinstance(value, str) else value for key, value in cells.items()}
            self.writer.writerow(cells)

    def close(self) -> None:
        self.file.close()


class JsonlWriter:
    def __init__(self, file):
        self.file = file

    def write(self, rows: list[dict]) -> None:
        self.file.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n"
                             for row in rows)

    def close(self) -> None:
        self.file.close()


class ParquetWriter:
    """Rows gathered into row groups of ROW_GROUP rows (one per model batch would make
    a slow file); the schema is the first row group's, strings where it saw only nulls."""

    ROW_GROUP = 16_384

    def __init__(self, path: Path):
        pq = pyarrow_for(path, "writing")
        import pyarrow as pa  # present: pyarrow_for imported its parquet module

        self.pa, self.pq, self.path = pa, pq, path
        self.rows: list[dict] = []
        self.writer = None

    def write(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        if len(self.rows) >= self.ROW_GROUP:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        pa = self.pa
        if self.writer is None:
            schema = pa.Table.from_pylist(self.rows).schema
            schema = pa.schema([field.with_type(pa.string()) if pa.types.is_null(field.type)
                                else field for field in schema])
            self.writer = self.pq.ParquetWriter(self.path, schema)
        try:
            table = pa.Table.from_pylist(self.rows, schema=self.writer.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise BatchError(f"{self.path}: a field's type changed between rows ({err}); "
                             "write .jsonl or .csv instead") from None
        self.writer.write_table(table)
        self.rows = []

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
        else:  # no rows: still a parquet file, with no columns
            self.pq.write_table(self.pa.table({}), self.path)


def open_text(path: Path):
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "wt", encoding="utf-8", newline="")
    return open(path, "w", encoding="utf-8", newline="")  # noqa: SIM115 - writer closes it


def open_writer(path: Path, fmt: str):
    """A writer of `fmt` onto `path` (the temporary file)."""
    if fmt == "parquet":
        return ParquetWriter(path)
    if fmt == "jsonl":
        return JsonlWriter(open_text(path))
    return DelimitedWriter(open_text(path), "\t" if fmt == "tsv" else ",")


class AtomicOutput:
    """A temporary file in `target`'s directory (same file system, so the final rename
    is atomic), renamed to `target` by commit(), removed by discard()."""

    def __init__(self, target: Path):
        self.target = target
        target.parent.mkdir(parents=True, exist_ok=True)
        # keeps the suffixes, so a gzip or format check on the name sees the real one;
        # created 0o666 less the umask, as the output itself would be (mkstemp: 0o600)
        while True:
            self.path = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial"
                                         f"{''.join(target.suffixes)}")
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                break
            except FileExistsError:
                continue

    def commit(self) -> None:
        os.replace(self.path, self.target)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
