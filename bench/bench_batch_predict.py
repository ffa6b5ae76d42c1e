"""Batch prediction over a file against the service and `mlflow models predict`.

    python bench/bench_batch_predict.py [--bundle models/current] [--rows 20000]
                                        [--rounds 3] [--seconds 10]

SST-2's dev texts repeated to --rows rows, in one CSV file with a `text` column,
predicted three ways with the same bundle (int8) in one run, in --rounds rounds (the
order alternating: the machine's speed drifts over minutes; medians are reported):
  1. `predict_file` (serving/batch/): one worker process per core, batches of 64,
     end to end: starting the workers, reading, scoring and writing a CSV file;
  2. the service as deployed (bench/bench_serving.py's setting: one server process per
     core, micro-batching on), prediction log off since batch prediction logs nothing
     either, loaded by bench/loadgen.py at concurrency 32 with 16 texts per request
     drawn from the same texts, for --seconds; the load generator shares the cores;
  3. `mlflow models predict --env-manager local` of the same bundle as the pyfunc model
     (serving/bundle/pyfunc.py): the registry's champion when ./mlflow.db holds this
     bundle's version as champion, else the pyfunc saved to a temporary directory.
     Its time includes starting MLflow.
1 and 3 are timed end to end; their startup alone (a one-row file) is shown too.
Only the one being measured runs: the service is stopped (SIGSTOP) meanwhile. The
answers of 3 are checked against 1's labels. Prints texts/s and the ratios, and writes
bench/results/batch_predict.json and docs/results/batch_predict.md (bench/results.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_serving import CORES, HOST, our_service  # noqa: E402
from loadgen import build_requests, run_load  # noqa: E402
from processes import freeze, thaw  # noqa: E402
from results import Result, Table, publish  # noqa: E402
from workload import bodies_for, dev_texts  # noqa: E402

from ops import control  # noqa: E402
from serving.batch import predict_file  # noqa: E402
from serving.bundle import read_meta  # noqa: E402

BATCH, SERVICE, MLFLOW = "predict_file", "service /predict", "mlflow models predict"
CONCURRENCY, PER_REQUEST = 32, 16


def write_input(path: Path, texts: list[str]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text"])
        writer.writerows([t] for t in texts)
    return path


def pyfunc_model(bundle_dir: Path, meta: dict, tmp: Path) -> tuple[str, dict, str]:
    """(model URI, environment, what it is): the registered champion when it is this
    bundle, else the same pyfunc saved locally."""
    import mlflow

    db = ROOT / "mlflow.db"
    if db.exists():
        client = mlflow.MlflowClient(f"sqlite:///{db}")
        try:
            champion = client.get_model_version_by_alias(meta["model_name"], "champion")
            if champion.tags.get("bundle_version") == meta["version"]:
                return (f"models:/{meta['model_name']}@champion",
                        {"MLFLOW_TRACKING_URI": f"sqlite:///{db}"},
                        f"registered champion, version {champion.version}")
        except mlflow.exceptions.MlflowException:
            pass
    path = tmp / "pyfunc"
    mlflow.pyfunc.save_model(
        path=str(path), python_model=str(ROOT / "serving" / "bundle" / "pyfunc.py"),
        artifacts={"bundle": str(bundle_dir)}, code_paths=[str(ROOT / "serving")],
        pip_requirements=["onnxruntime", "tokenizers", "pandas"])  # not inferred: slow
    return str(path), {}, "pyfunc saved locally (no registered champion of this bundle)"


def mlflow_predict(model: str, env: dict, source: Path, out: Path) -> float:
    """Wall seconds of `mlflow models predict` on `source` (its labels in `out`)."""
    python = Path(sys.executable)
    command = [str(python.parent / "mlflow"), "models", "predict", "-m", model, "-i",
               str(source), "-t", "csv", "-o", str(out), "--env-manager", "local"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{python.parent}:{os.environ['PATH']}",
                               **env})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"mlflow models predict failed:\n{done.stderr[-3000:]}")
    return seconds


def mlflow_labels(out: Path) -> list[str]:
    body = json.loads(out.read_text())
    rows = body["predictions"] if isinstance(body, dict) else body
    return [row["label"] for row in rows]


def batch_labels(out: Path) -> list[str]:
    with open(out, encoding="utf-8", newline="") as f:
        return [row["label"] for row in csv.DictReader(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="models/current")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="service load per round")
    parser.add_argument("--skip-mlflow", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    bundle_dir = (ROOT / args.bundle).resolve()
    meta = read_meta(bundle_dir)
    dev = dev_texts()
    texts = (dev * (args.rows // len(dev) + 1))[:args.rows]
    runs: dict[str, list[float]] = {BATCH: [], SERVICE: []}
    extra: dict = {}
    logs = ROOT / "bench" / "results"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        source = write_input(tmp / "input.csv", texts)
        port = control.free_port()
        _, service = stack.enter_context(our_service(
            bundle_dir, port, logs / "batch_predict-service.log",
            {"TEXTOPS_PREDICTION_LOG": ""}))
        freeze(service)
        stack.callback(thaw, service)
        requests = build_requests(HOST, "/predict", bodies_for("service", texts, PER_REQUEST))
        one_row = write_input(tmp / "one.csv", texts[:1])
        extra["batch_startup_s"] = predict_file(one_row, tmp / "one.csv.out.csv", bundle_dir,
                                                progress=False).seconds
        if not args.skip_mlflow:
            model, env, extra["mlflow_model"] = pyfunc_model(bundle_dir, meta, tmp)
            runs[MLFLOW] = []
            extra["mlflow_startup_s"] = mlflow_predict(model, env, one_row, tmp / "one.json")
        for round_ in range(args.rounds):
            ways = list(runs) if round_ % 2 == 0 else list(reversed(runs))
            for way in ways:
                if way == BATCH:
                    summary = predict_file(source, tmp / "batch.csv", bundle_dir,
                                           progress=False)
                    runs[BATCH].append(summary.texts_per_s)
                elif way == SERVICE:
                    thaw(service)
                    load = run_load(HOST, port, requests, CONCURRENCY, args.seconds, 1.0)
                    freeze(service)
                    result = load.summary(PER_REQUEST, CORES)
                    if result["errors"]:
                        raise RuntimeError(f"the service answered {result['errors']} errors")
                    runs[SERVICE].append(result["texts_per_s"])
                    extra["service_client_cpu_share"] = result["client_cpu_share"]
                else:
                    seconds = mlflow_predict(model, env, source, tmp / "mlflow.json")
                    runs[MLFLOW].append(len(texts) / seconds)
                print(f"round {round_ + 1}  {way:<22} {runs[way][-1]:9.1f} texts/s",
                      flush=True)
        if not args.skip_mlflow:
            ours, theirs = batch_labels(tmp / "batch.csv"), mlflow_labels(tmp / "mlflow.json")
            assert len(ours) == len(theirs) == len(texts), (len(ours), len(theirs))
            extra["mlflow_label_agreement"] = sum(
                a == b for a, b in zip(ours, theirs, strict=True)) / len(texts)
    report(runs, extra, args, meta)


def report(runs: dict[str, list[float]], extra: dict, args, meta: dict) -> None:
    medians = {way: statistics.median(values) for way, values in runs.items()}
    ratios = {way: medians[BATCH] / medians[way] for way in runs if way != BATCH}
    notes = {BATCH: f"{CORES} worker processes, batches of 64, CSV in and out; startup "
                    f"{extra['batch_startup_s']:.1f} s included",
             SERVICE: f"{CORES} server processes, concurrency {CONCURRENCY}, "
                      f"{PER_REQUEST} texts/request, log off",
             MLFLOW: f"{extra.get('mlflow_model', '')}; startup "
                     f"{extra.get('mlflow_startup_s', 0):.1f} s included"}
    print(f"\n{args.rows:,} texts, median of {args.rounds} rounds:")
    rows = []
    for way, value in medians.items():
        ratio = ratios.get(way, 1.0)
        print(f"  {way:<22} {value:9.1f} texts/s   predict_file / this: {ratio:5.2f}x")
        rows.append([way, round(value, 1), round(ratio, 2), notes[way]])
    if "mlflow_label_agreement" in extra:
        print(f"  labels: mlflow agrees with predict_file on "
              f"{extra['mlflow_label_agreement']:.2%} of texts")
    page = publish(Result(
        name="batch_predict", title="Batch prediction over files",
        about=f"""`predict_file` (serving/batch/, `python -m serving.batch`) on SST-2's dev
texts repeated to {args.rows:,} rows, against the service at its best setting and
`mlflow models predict`, the same texts and bundle (`{meta['version']}`, int8), median of
{args.rounds} rounds. Ratios are `predict_file`'s texts/s over each, measured in the same
run. The service shares the cores with its load generator (client CPU share
{extra.get('service_client_cpu_share', 0):.0%}).

    python bench/bench_batch_predict.py --rows {args.rows} --rounds {args.rounds} \
--seconds {args.seconds:g}""",
        tables=[Table("Texts per second", ["way", "texts/s", "predict_file / this", "setting"],
                      rows)],
        data={"args": vars(args), "texts_per_s": runs, "median": medians, "ratios": ratios,
              **extra},
        summary=[["textops predict, texts/s over a file", round(medians[BATCH])],
                 *([[f"textops predict vs {way}", f"{ratio:.2f}x"]
                    for way, ratio in ratios.items()])]))
    print(f"\nwrote {page}")


if __name__ == "__main__":
    main()
