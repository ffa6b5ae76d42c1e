"""Batch prediction over files (serving/batch/): the live service's answers for every
row, in every format, bad rows reported by line, worker processes, bounded memory."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, inside

from serving.batch import BadRowsError, BatchError, Record, predict_file, readers, runner
from serving.batch import pool as batch_pool
from serving.batch import progress as batch_progress

DEV = ROOT / "data/external/sst2/dev.tsv.gz"
PROBS = ("p_neg", "p_pos")  # the smoke bundle's classes: neg, pos
# Texts a careless writer or reader would change: quoting, separators, non-ASCII, spaces.
TRICKY = ['he said "superb", then left', "a, b; c", "l'été à Paris — très bien",
          "日本語のテキスト", "emoji 🎬🍿 film", "  padded  ", "back\\slash", "'quoted'",
          "=1+2", "NaN", "null"]


def dev_rows(count: int, max_chars: int = 200) -> list[dict]:
    """SST-2 dev rows (sentence, label) that the live service's small limits accept."""
    with gzip.open(DEV, "rt", encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [r for r in rows if len(r["sentence"]) <= max_chars][:count]


def open_text(path: Path, mode: str):
    opener = gzip.open if path.suffix == ".gz" else open
    return opener(path, mode + "t", encoding="utf-8", newline="")


def write_input(path: Path, rows: list[dict]) -> Path:
    """`rows` as the file `path` names (csv, tsv, jsonl, any of them .gz, parquet)."""
    kind = path.name.split(".")[1]
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "jsonl":
        with open_text(path, "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        tsv = kind == "tsv"
        with open_text(path, "w") as f:
            writer = csv.DictWriter(f, list(rows[0]), delimiter="\t" if tsv else ",",
                                    quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
                                    quotechar=None if tsv else '"')
            writer.writeheader()
            writer.writerows(rows)
    return path


def read_output(path: Path) -> list[dict]:
    """An output file's rows, read with the standard library or pyarrow (not with
    serving/batch's readers), numbers as numbers."""
    kind = path.name.split(".")[1]
    if kind == "parquet":
        return pq.read_table(path).to_pylist()
    with open_text(path, "r") as f:
        if kind == "jsonl":
            return [json.loads(line) for line in f]
        tsv = kind == "tsv"
        rows = list(csv.DictReader(f, delimiter="\t" if tsv else ",",
                                   quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL))
    for row in rows:
        row["line"] = int(row["line"])
        row.update({key: float(row[key]) for key in ("score", *PROBS)})
    return rows


def answers(rows: list[dict]) -> list[tuple]:
    return [(r["label"], r["score"], *(r[p] for p in PROBS)) for r in rows]


def test_answers_equal_the_live_service(built_bundle, live_service, tmp_path):
    """SST-2 dev rows: each label and probability is what /predict answers for the text
    (requests of 8, the service's test limit, scored as batches of 8 here)."""
    bundle_dir, meta = built_bundle
    rows = dev_rows(96)
    source = write_input(tmp_path / "dev.tsv.gz", rows)
    summary = predict_file(source, tmp_path / "out.jsonl", bundle_dir, batch_size=8,
                           workers=1)
    texts = [r["sentence"] for r in rows]
    served = []
    with httpx.Client(base_url=live_service.url, timeout=30) as client:
        for start in range(0, len(texts), 8):  # one at a time: each its own batch
            body = client.post("/predict", json={"texts": texts[start:start + 8]}).json()
            assert body["model_version"] == summary.model_version == meta["version"]
            served += body["predictions"]
    got = read_output(tmp_path / "out.jsonl")
    assert [r["sentence"] for r in got] == texts
    assert [r["input_label"] for r in got] == [r["label"] for r in rows]  # kept, renamed
    assert [r["line"] for r in got] == list(range(2, len(rows) + 2))
    assert [r["label"] for r in got] == [p["label"] for p in served]
    for row, answer in zip(got, served, strict=True):
        assert row["score"] == pytest.approx(answer["score"], abs=1e-6)
        for name, p in answer["probabilities"].items():
            assert row[f"p_{name}"] == pytest.approx(p, abs=1e-6)
    assert summary.rows == len(rows) and summary.bad_rows == 0 and summary.texts_per_s > 0


@pytest.fixture(scope="module")
def reference(built_bundle, tmp_path_factory):
    """The tricky texts and some dev rows, predicted once from csv into jsonl."""
    bundle_dir, _ = built_bundle
    rows = [{"id": str(i), "text": t} for i, t in
            enumerate(TRICKY + [r["sentence"] for r in dev_rows(40)])]
    tmp = tmp_path_factory.mktemp("reference")
    predict_file(write_input(tmp / "in.csv", rows), tmp / "out.jsonl", bundle_dir, workers=1)
    return rows, read_output(tmp / "out.jsonl")


OUTPUTS = ("out.csv", "out.tsv", "out.jsonl", "out.parquet", "out.csv.gz")


@pytest.mark.parametrize("name", ["in.csv", "in.tsv", "in.jsonl", "in.parquet",
                                  "in.csv.gz", "in.tsv.gz", "in.jsonl.gz"])
def test_every_format_round_trips(name, built_bundle, reference, tmp_path):
    """Any input format into every output format: the same texts, fields and answers."""
    bundle_dir, _ = built_bundle
    rows, expected = reference
    source = write_input(tmp_path / name, rows)
    first = 2 if name.split(".")[1] in ("csv", "tsv") else 1  # a header is line 1
    for out in OUTPUTS:
        predict_file(source, tmp_path / out, bundle_dir, workers=1)
        got = read_output(tmp_path / out)
        assert [r["text"] for r in got] == [r["text"] for r in rows], out
        assert [str(r["id"]) for r in got] == [r["id"] for r in rows], out
        assert [r["line"] for r in got] == list(range(first, first + len(rows))), out
        assert answers(got) == answers(expected), out


BAD_INPUTS = {
    # name: (content, {bad line: words of the reason})
    "bad.csv": ("id,text\n" + "".join(f"{i},text number {i}\n" if i not in (6, 9) else
                                      (f"{i},\n" if i == 6 else f"{i},a,b\n")
                                      for i in range(1, 15)),
                {7: "empty text", 10: "3 fields, expected 2"}),
    "bad.jsonl": ("".join('{"text": "row ' + str(i) + '"}\n' if i not in (4, 8) else
                          ('{"text": "unclosed\n' if i == 4 else '{"text": 8}\n')
                          for i in range(1, 13)),
                  {4: "invalid JSON", 8: "'text' is int, not a string"}),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_rows_are_reported_by_line(name, built_bundle, tmp_path):
    bundle_dir, _ = built_bundle
    content, bad = BAD_INPUTS[name]
    source = tmp_path / name
    source.write_text(content, encoding="utf-8")
    out = tmp_path / "out.csv"
    out.write_text("an earlier run's output\n")
    with pytest.raises(BadRowsError) as failure:
        predict_file(source, out, bundle_dir, workers=1)
    for line, reason in bad.items():
        assert f"{source}:{line}: {reason}" in str(failure.value)
    # nothing written: the earlier output whole, no partial or errors file beside it
    assert out.read_text() == "an earlier run's output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "out.csv"])

    summary = predict_file(source, out, bundle_dir, workers=1, on_error="report")
    total = len(content.splitlines()) - (name.endswith(".csv"))
    assert summary.bad_rows == len(bad) and summary.rows == total - len(bad)
    written = read_output(out)
    good_lines = [n for n in range(1 + name.endswith(".csv"), len(content.splitlines()) + 1)
                  if n not in bad]
    assert [r["line"] for r in written] == good_lines
    listed = [json.loads(line) for line in summary.errors.read_text().splitlines()]
    assert summary.errors == tmp_path / "out.csv.errors.jsonl"
    assert [(e["line"], e["file"]) for e in listed] == [(n, str(source)) for n in bad]
    assert all(reason in e["reason"] for e, reason in zip(listed, bad.values(), strict=True))


def test_two_workers_write_what_one_writes_in_input_order(built_bundle, tmp_path):
    bundle_dir, _ = built_bundle
    # chunks of 8 texts, long and short in turns: a short chunk submitted after a long
    # one is done first, and must still be written after it
    dev = [r["sentence"] for r in dev_rows(150)]
    rows = [{"text": text * (40 if i // 8 % 2 == 0 else 1)} for i, text in enumerate(dev)]
    rows += [{"text": text} for text in dev]
    source = write_input(tmp_path / "in.jsonl", rows)
    one = predict_file(source, tmp_path / "one.csv", bundle_dir, workers=1, batch_size=8)
    two = predict_file(source, tmp_path / "two.csv", bundle_dir, workers=2, batch_size=8)
    assert (tmp_path / "two.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert [r["line"] for r in read_output(tmp_path / "two.csv")] == list(range(1, 301))
    assert one.rows == two.rows == 300


def test_rows_in_flight_stay_bounded(built_bundle, tmp_path, monkeypatch):
    """A generator-backed input far larger than the bound: rows read ahead of the rows
    written never exceed the chunks in flight (2 per worker), plus the one being written."""
    bundle_dir, _ = built_bundle
    counts = {"read": 0, "written": 0, "ahead": []}

    class Endless:  # a reader registered through the seam another input kind would use
        def __init__(self, path):
            self.path, self.total_rows = path, None

        def columns(self):
            return ["text"]

        def records(self):
            for i in range(1, 5001):
                counts["ahead"].append(counts["read"] - counts["written"])
                counts["read"] += 1
                yield Record(i, {"text": f"generated text number {i}"})

        def fraction_read(self):
            return None

        def close(self):
            pass

    monkeypatch.setitem(readers.READERS, "endless", Endless)
    monkeypatch.setitem(readers.SUFFIXES, "endless", "endless")
    open_writer = runner.open_writer

    def counting_writer(path, fmt):
        writer = open_writer(path, fmt)
        write = writer.write

        def counted(rows):
            counts["written"] += len(rows)
            write(rows)
        writer.write = counted
        return writer

    monkeypatch.setattr(runner, "open_writer", counting_writer)
    source = tmp_path / "big.endless"
    source.touch()
    summary = predict_file(source, tmp_path / "out.csv", bundle_dir, workers=2,
                           batch_size=16)
    assert summary.rows == counts["read"] == counts["written"] == 5000
    bound = (runner.CHUNKS_IN_FLIGHT_PER_WORKER * 2 + 1) * 16
    assert max(counts["ahead"]) <= bound


def test_ordered_map_bounds_what_it_takes_and_keeps_the_order():
    taken, yielded, ahead = [0], [0], []

    def items():
        for i in range(200):
            ahead.append(taken[0] - yielded[0])
            taken[0] += 1
            yield i

    def slow_square(i):  # later items often finish first
        time.sleep(0.002 * (i % 5))
        return i * i

    with ThreadPoolExecutor(4) as executor:
        results = []
        for item, result in batch_pool.ordered_map(
                lambda i: executor.submit(slow_square, i), items(), max_in_flight=6):
            results.append((item, result))
            yielded[0] += 1
    assert results == [(i, i * i) for i in range(200)]
    assert max(ahead) <= 6


def test_the_text_column_is_chosen_or_the_error_names_the_columns(built_bundle, tmp_path):
    bundle_dir, _ = built_bundle
    source = write_input(tmp_path / "in.csv", [{"review": "superb film", "note": "x"}])
    with pytest.raises(BatchError, match=r"in\.csv: no text column.*'review', 'note'"):
        predict_file(source, tmp_path / "out.csv", bundle_dir, workers=1)
    with pytest.raises(BatchError, match=r"no column 'body' \(columns: 'review', 'note'\)"):
        predict_file(source, tmp_path / "out.csv", bundle_dir, workers=1, column="body")
    assert not (tmp_path / "out.csv").exists()
    predict_file(source, tmp_path / "out.csv", bundle_dir, workers=1, column="review")
    assert read_output(tmp_path / "out.csv")[0]["review"] == "superb film"


def test_progress_is_logged_with_rate_and_eta_off_a_terminal(built_bundle, tmp_path,
                                                             monkeypatch, caplog, capsys):
    bundle_dir, _ = built_bundle
    source = write_input(tmp_path / "in.csv", [{"text": f"text {i}"} for i in range(200)])
    monkeypatch.setattr(batch_progress, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="serving.batch"):
        predict_file(source, tmp_path / "out.csv", bundle_dir, workers=1, batch_size=16,
                     progress=False)
    # the progress lines, not the closing summary (which gives the rate too)
    lines = [r.getMessage() for r in caplog.records if r.module == "progress"]
    assert lines and "rows/s" in lines[-1] and "ETA" in lines[-1] and "in.csv: " in lines[-1]
    predict_file(source, tmp_path / "out.csv", bundle_dir, workers=1, progress=True)
    assert "200/200" in capsys.readouterr().err  # tqdm's bar, on stderr


def test_a_registry_alias_predicts_with_its_version(built_bundle, tmp_path, monkeypatch):
    import mlflow

    from pipeline.tracking import registry

    bundle_dir, meta = built_bundle
    db = f"sqlite:///{tmp_path}/mlflow.db"
    with inside(tmp_path):
        mlflow.set_tracking_uri(db)
        client = mlflow.MlflowClient()
        experiment = client.create_experiment("batch", (tmp_path / "mlruns").as_uri())
        run = client.create_run(experiment).info.run_id
        version = registry.register(bundle_dir, meta, run)
        client.set_registered_model_alias(meta["model_name"], "champion", version)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db)
    monkeypatch.setenv("TEXTOPS_CACHE_DIR", str(tmp_path / "cache"))
    source = write_input(tmp_path / "in.csv", [{"text": t} for t in TRICKY])
    summary = predict_file(source, tmp_path / "alias.csv",
                           f"models:/{meta['model_name']}@champion", workers=1)
    assert summary.model == f"{meta['model_name']}/{version}"
    assert summary.model_version == meta["version"]
    predict_file(source, tmp_path / "dir.csv", bundle_dir, workers=1)
    assert (tmp_path / "alias.csv").read_bytes() == (tmp_path / "dir.csv").read_bytes()


def test_the_command_line(built_bundle, tmp_path):
    bundle_dir, _ = built_bundle
    source = write_input(tmp_path / "in.csv", [{"text": "superb"}, {"text": " "}])

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "serving.batch", *map(str, args)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    assert "examples:" in cli("--help").stdout
    failed = cli(source, "--out", tmp_path / "out.csv", "-m", bundle_dir, "-w", "1")
    assert failed.returncode == 1 and f"{source}:3: empty text" in failed.stderr
    assert not (tmp_path / "out.csv").exists()
    done = cli(source, "--out", tmp_path / "out.csv", "-m", bundle_dir, "-w", "1",
               "--on-error", "report")
    assert done.returncode == 0, done.stderr
    assert "1 rows, 1 bad" in done.stdout
    assert [r["text"] for r in read_output(tmp_path / "out.csv")] == ["superb"]
    missing = cli(tmp_path / "nope.csv", "--out", tmp_path / "x.csv", "-m", bundle_dir)
    assert missing.returncode == 2 and "nope.csv: no such file" in missing.stderr


def test_an_interrupted_run_leaves_no_output(built_bundle, tmp_path, monkeypatch):
    bundle_dir, _ = built_bundle
    source = write_input(tmp_path / "in.csv", [{"text": f"t {i}"} for i in range(100)])
    calls = threading.local()
    score = batch_pool.score

    def dies_midway(texts):
        calls.n = getattr(calls, "n", 0) + 1
        if calls.n == 3:
            raise KeyboardInterrupt
        return score(texts)

    monkeypatch.setattr(batch_pool, "score", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        predict_file(source, tmp_path / "out.parquet", bundle_dir, workers=1, batch_size=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]
