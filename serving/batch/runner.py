"""`predict_file`: a model's answers for every row of a file, written to another file.

The file is read in chunks, scored by a pool of worker processes (serving/batch/pool.py)
with a bounded number of chunks in flight, and written in input order as chunks come
back, so memory stays flat however large the file. Each answer is what the service's
/predict gives for that text: the same bundle (a directory or a registry URI, fetched as
the service fetches it), precision, tokenizer and batching.

An image bundle takes a folder of images or a table of image paths instead
(serving/batch/images.py): the workers read and decode the files, and each answer is
what /predict gives for that file's bytes.

A row without a usable text (or image) is never skipped silently: by default the run
stops, listing the first bad lines (or files), and writes nothing; with
on_error="report" the good rows are written and every bad one is listed in
`<out>.errors.jsonl`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from serving.batch.answers import OutputRows
from serving.batch.images import (
    Scored,
    bundle_takes_images,
    holds_images,
    marked,
    score_files,
    with_image_files,
)
from serving.batch.pool import ordered_map, scorer
from serving.batch.progress import Progress, bar_wanted
from serving.batch.readers import BatchError, Record, RowReader, open_reader
from serving.batch.texts import choose_text_columns, text_of
from serving.batch.writers import AtomicOutput, JsonlWriter, open_writer, output_format
from serving.bundle import MODEL_FILES, read_meta
from serving.engine.source import BundleSource
from serving.settings import ENV_PREFIX, Settings, available_cores

log = logging.getLogger("serving.batch")

ON_ERROR = ("fail", "report")
SHOWN_BAD_ROWS = 10  # listed in the error of a run that fails on bad rows
CHUNKS_IN_FLIGHT_PER_WORKER = 2  # one being scored, one queued: no worker waits on us
RECORDS_PER_CHUNK = 4  # x batch_size: a chunk of mostly bad rows still ends


@dataclass
class BatchSummary:
    rows: int  # rows predicted and written
    bad_rows: int  # rows without a usable text (listed in `errors`, or the run failed)
    seconds: float  # the whole run: starting the workers, reading, scoring, writing
    texts_per_s: float
    out: Path
    model_version: str  # bundle.json's version
    model: str  # where the bundle came from: its directory, or <name>/<version>
    errors: Path | None = None  # the bad lines, with on_error="report"


class BadRowsError(BatchError):
    """Rows without a usable text, with on_error="fail"; nothing was written."""

    def __init__(self, path: Path, bad: list[Record], complete: bool):
        self.bad_rows = bad
        count = f"{len(bad)}" if complete else f"{len(bad)} or more"
        listed = "\n".join(f"  {where(path, r)}: {r.problem}" for r in bad)
        super().__init__(f"{path}: {count} bad rows; nothing was written. Fix them, or "
                         f"pass on_error='report' (--on-error report) to write the other "
                         f"rows and list the bad ones in <out>.errors.jsonl:\n{listed}")


def where(path: Path, record: Record) -> str:
    """A bad row as reported: the image file it names, else the input's file:line."""
    return record.item or f"{path}:{record.line}"


@dataclass
class Chunk:
    records: list[Record]  # in file order, bad ones (with a problem) included
    texts: list[str]  # the good records' texts (image bundles: files), in the same order


def service_default(name: str) -> str:
    """A setting as the service would take it: TEXTOPS_<NAME>, else its default."""
    return os.environ.get(ENV_PREFIX + name.upper()) or str(Settings.model_fields[name].default)


def resolve_model(model: str | Path) -> tuple[Path, str]:
    """(local bundle directory, identity) for a directory or a models:/ URI."""
    source = BundleSource(str(model), service_default("cache_dir"))
    identity = source.identity()
    return Path(source.fetch(identity)), identity


def with_texts(reader: RowReader, column: str | None, meta: dict
               ) -> Iterator[tuple[Record, str | None]]:
    """Each record with its text, or with its problem set and no text."""
    columns = reader.columns()
    names = choose_text_columns(reader.path, columns, column, meta) if columns else None
    if names:
        log.info("%s: texts from %s", reader.path, " + ".join(map(repr, names)))
    for record in reader.records():
        if record.fields is None:
            yield record, None
            continue
        if names is None:  # JSON lines: the first object's fields decide
            names = choose_text_columns(reader.path, list(record.fields), column, meta)
            log.info("%s: texts from %s", reader.path, " + ".join(map(repr, names)))
        text, record.problem = text_of(record.fields, names)
        yield record, text


def failing_on_bad_rows(pairs: Iterator[tuple[Record, str | None]], path: Path):
    """The pairs, until a bad row: then BadRowsError with the first few bad rows."""
    for record, text in pairs:
        if record.problem:
            more = (r for r, _ in pairs if r.problem)
            bad = [record, *islice(more, SHOWN_BAD_ROWS - 1)]
            raise BadRowsError(path, bad, complete=len(bad) < SHOWN_BAD_ROWS)
        yield record, text


def chunked(pairs, batch_size: int) -> Iterator[Chunk]:
    records, texts = [], []
    for record, text in pairs:
        records.append(record)
        if text is not None:
            texts.append(text)
        if len(texts) == batch_size or len(records) == RECORDS_PER_CHUNK * batch_size:
            yield Chunk(records, texts)
            records, texts = [], []
    if records:
        yield Chunk(records, texts)


@dataclass
class Plan:
    """One run's settled choices, checked before anything is read or written."""

    source: Path
    out: Path
    out_format: str
    bundle_dir: Path
    meta: dict
    precision: str
    workers: int
    column: str | None
    batch_size: int
    progress: bool | None
    on_error: str
    images: bool  # an image bundle: rows name image files


def predict_file(source: str | Path, out: str | Path, model: str | Path = "models/current",
                 *, column: str | None = None, workers: int | None = None,
                 batch_size: int = 64, progress: bool | None = None,
                 precision: str | None = None, on_error: str = "fail") -> BatchSummary:
    """Predict every row of `source` (csv, tsv, jsonl, their .gz, parquet) into `out`
    (its format from its name), with the bundle `model`: a directory or a registry URI
    `models:/<name>@<alias>` / `models:/<name>/<version>`.

    column: the text column (default: the bundle's, else `text`, else `sentence`).
    workers: processes, each on one core (default: every core this process may use).
    batch_size: texts per model call (the service's default max_batch_size is 64).
    progress: a bar (True), log lines (False), or a bar only on a terminal (None).
    precision: int8 or fp32 (default: the service's, TEXTOPS_PRECISION or int8).
    on_error: "fail" (nothing written) or "report" (bad lines in <out>.errors.jsonl).
    """
    started = time.perf_counter()
    source, out = Path(source), Path(out)
    if on_error not in ON_ERROR:
        raise BatchError(f"on_error must be one of {', '.join(ON_ERROR)}, not {on_error!r}")
    if batch_size < 1 or (workers is not None and workers < 1):
        raise BatchError("batch_size and workers must be at least 1")
    out_format = output_format(out)
    if out.resolve() == source.resolve():
        raise BatchError(f"{out}: the output would overwrite the input")
    precision = precision or service_default("precision")
    if precision not in MODEL_FILES:
        raise BatchError(f"precision must be one of {', '.join(MODEL_FILES)}")
    reader = open_reader(source)  # a missing input fails before a model is fetched
    try:
        bundle_dir, identity = resolve_model(model)
        meta = read_meta(bundle_dir)
        plan = Plan(source, out, out_format, bundle_dir, meta, precision,
                    workers or available_cores(), column, batch_size, progress, on_error,
                    bundle_takes_images(reader, meta, identity))
        log.info("%s -> %s: bundle %s (%s, %s), %d worker process(es)", source, out,
                 plan.meta["version"], identity, precision, plan.workers)
        written, bad = run(plan, reader)
    finally:
        reader.close()
    seconds = time.perf_counter() - started
    summary = BatchSummary(rows=written, bad_rows=bad, seconds=seconds,
                           texts_per_s=written / seconds if seconds else 0.0, out=out,
                           model_version=str(plan.meta["version"]), model=identity,
                           errors=error_file(out) if on_error == "report" else None)
    log.info("%s: %d rows, %d bad, in %.1f s (%.0f rows/s)", out, written, bad, seconds,
             summary.texts_per_s)
    return summary


def run(plan: Plan, reader: RowReader) -> tuple[int, int]:
    """Read, score and write; (rows written, bad rows). Both files are committed only
    when everything succeeded, and removed otherwise."""
    output, errors = AtomicOutput(plan.out), AtomicOutput(error_file(plan.out))
    written = bad = 0
    pool = None
    writers = []
    try:
        writers.append(open_writer(output.path, plan.out_format))
        writers.append(JsonlWriter(open(errors.path, "w", encoding="utf-8")))  # noqa: SIM115
        writer, error_writer = writers
        pool = scorer(str(plan.bundle_dir), plan.precision, plan.workers,
                      score_files if plan.images else None)
        numbered = not holds_images(reader)
        shaper = OutputRows(list(plan.meta["label_names"]), numbered)
        pairs = (with_image_files(reader, plan.column) if plan.images
                 else with_texts(reader, plan.column, plan.meta))
        if plan.on_error == "fail":
            pairs = failing_on_bad_rows(pairs, plan.source)
        chunks = chunked(pairs, plan.batch_size)
        in_flight = CHUNKS_IN_FLIGHT_PER_WORKER * plan.workers
        meter = Progress(plan.source.name, reader.total_rows, reader.fraction_read,
                         bar_wanted(plan.progress))
        try:
            for chunk, result in ordered_map(lambda c: submit(pool, c), chunks, in_flight):
                # image files that turned out not to be images get their problem here
                probs = marked(chunk.records, result) if isinstance(result, Scored) else result
                failed = [r for r in chunk.records if r.problem]
                if failed and plan.on_error == "fail":  # only files: bad rows failed earlier
                    raise BadRowsError(plan.source, failed[:SHOWN_BAD_ROWS], complete=False)
                rows = shaper.rows(chunk.records, probs)
                writer.write(rows)
                error_writer.write([error_entry(plan.source, r, numbered) for r in failed])
                written, bad = written + len(rows), bad + len(failed)
                meter.advance(len(chunk.records))
        finally:
            meter.close()
        for opened in writers:
            opened.close()
    except BaseException:
        if pool is not None:
            pool.close(cancel=True)
        for opened in writers:
            with contextlib.suppress(Exception):
                opened.close()
        output.discard()
        errors.discard()
        raise
    pool.close()
    output.commit()
    if plan.on_error == "report":
        errors.commit()
    else:  # no bad rows, or it would have failed: an older run's list would mislead
        errors.discard()
        errors.target.unlink(missing_ok=True)
    return written, bad


def error_entry(source: Path, record: Record, numbered: bool) -> dict:
    """A line of <out>.errors.jsonl: the file to fix (the input, or the image a row
    names), the input's line when it has lines, and the reason."""
    entry = {"file": record.item or str(source)}
    if numbered:
        entry["line"] = record.line
    return {**entry, "reason": record.problem}


def error_file(out: Path) -> Path:
    return out.with_name(out.name + ".errors.jsonl")


def submit(pool, chunk: Chunk) -> Future:
    if chunk.texts:
        return pool.submit(chunk.texts)
    done: Future = Future()  # only bad rows: nothing to score
    done.set_result(np.empty((0, 0), dtype=np.float32))
    return done
