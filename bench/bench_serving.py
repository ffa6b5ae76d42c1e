"""Serving benchmark: this service against the in-process limit and the alternatives.

    python bench/bench_serving.py [--seconds 6] [--concurrency 1 8 32 128]   (make bench)

Measured in one run, interleaved (the machine's speed drifts over minutes), with
SST-2 dev texts, one text and 16 texts per request, loopback only:
  1. in-process limit: the same ONNX model called in-process, no HTTP, length-grouped
     batches of 1 to 64 (the best is kept);
  2. this service, micro-batching on (int8);
  3. this service, batching off;
  4. naive baseline: FastAPI calling the PyTorch checkpoint once per request;
  5. `mlflow models serve` of the registered champion.
Prints throughput and p50/p95/p99 latency per setting, the load generator's CPU share,
and the ratios 2/1, 2/4 and 2/5 against the targets. Writes bench/results/serving.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from loadgen import build_requests, run_load  # noqa: E402

from serving import control  # noqa: E402
from serving.batcher import length_groups  # noqa: E402
from serving.bundle import Bundle, softmax  # noqa: E402

CORES = os.cpu_count() or 1
HOST = "127.0.0.1"
TARGETS = {"2/1 (1 text)": 0.85, "2/4": 3.0, "2/5": 4.0, "2/1 (16 texts)": 0.9}


def dev_texts() -> list[str]:
    with gzip.open(ROOT / "data/external/sst2/dev.tsv.gz", "rt", encoding="utf-8") as f:
        return [line.split("\t")[0].strip() for line in f.read().splitlines()[1:]]


# ---------------------------------------------------------------- 1. in-process limit


def in_process_limit(bundle: Bundle, texts: list[str], batch_sizes=(1, 4, 16, 64),
                     seconds: float = 3.0) -> dict:
    """Texts per second of tokenize + length-grouped ONNX calls, for each batch size."""
    results = {}
    for size in batch_sizes:
        count, started, latencies = 0, time.perf_counter(), []
        while time.perf_counter() - started < seconds:
            for start in range(0, len(texts), size):
                chunk = texts[start : start + size]
                t0 = time.perf_counter()
                encoded = bundle.encode(chunk)
                lengths = [len(ids) for ids in encoded]
                for group in length_groups(lengths):
                    softmax(bundle.run([encoded[i] for i in group]))
                latencies.append(time.perf_counter() - t0)
                count += len(chunk)
        elapsed = time.perf_counter() - started
        ms = np.asarray(latencies) * 1000
        results[size] = {"texts_per_s": count / elapsed, "p50_ms": float(np.percentile(ms, 50)),
                         "p95_ms": float(np.percentile(ms, 95)),
                         "p99_ms": float(np.percentile(ms, 99))}
    return results


# ---------------------------------------------------------------- the servers


@contextmanager
def server(command: list[str], port: int, ready_path: str, log: Path, env: dict | None = None):
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})},
                               stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        try:
            control.wait_until(f"http://{HOST}:{port}{ready_path}", 180, process)
        except RuntimeError as err:
            raise RuntimeError(f"{command[:3]}: {err}: {log.read_text()[-2000:]}") from None
        yield port
    finally:
        control.stop(process)


def bodies_for(kind: str, texts: list[str], per_request: int) -> list[bytes]:
    chunks = [texts[i : i + per_request] for i in range(0, len(texts) - per_request + 1,
                                                        per_request)]
    if kind == "mlflow":
        return [json.dumps({"dataframe_split": {"columns": ["text"],
                                                "data": [[t] for t in c]}}).encode()
                for c in chunks]
    return [json.dumps({"texts": c}).encode() for c in chunks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="models/current")
    parser.add_argument("--checkpoint", default="models/checkpoints/best.ckpt")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--per-request", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--skip", nargs="*", default=[], help="naive, mlflow")
    args = parser.parse_args()

    bundle_dir = (ROOT / args.bundle).resolve()
    bundle = Bundle.load(bundle_dir, "int8")
    texts = dev_texts()
    logs = ROOT / "bench" / "results"
    logs.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    setups = {
        "service, batching on": ("service", [python, "-m", "serving"], "/health/ready",
                                 {"TEXTOPS_BATCHING": "true"}),
        "service, batching off": ("service", [python, "-m", "serving"], "/health/ready",
                                  {"TEXTOPS_BATCHING": "false"}),
        "naive FastAPI + PyTorch": ("naive", [python, "bench/naive_server.py",
                                              args.checkpoint, str(bundle_dir / "tokenizer.json")],
                                    "/health", {"PYTHONPATH": str(ROOT)}),
        "mlflow models serve": ("mlflow", [str(Path(python).parent / "mlflow"), "models",
                                           "serve", "-m",
                                           f"models:/{bundle.meta['model_name']}@champion",
                                           "--env-manager", "local", "-h", HOST],
                                # it starts `uvicorn` from PATH: the venv's, not activated
                                "/ping", {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db",
                                          "PATH": f"{Path(python).parent}:{os.environ['PATH']}"}),
    }
    setups = {k: v for k, v in setups.items() if v[0] not in args.skip}
    results: dict = {"in-process limit": {}, **{name: {} for name in setups}}
    with ExitStack() as stack:
        ports = {}
        for name, (kind, command, ready, env) in setups.items():
            port = control.free_port()
            if kind == "service":
                env = {**env, "TEXTOPS_BUNDLE": str(bundle_dir), "TEXTOPS_PORT": str(port),
                       "TEXTOPS_MAX_QUEUE": "4096", "TEXTOPS_WATCH_INTERVAL_S": "0"}
            elif kind == "naive":
                command = [*command, str(port)]
            else:
                command = [*command, "-p", str(port)]
            log = logs / f"{kind}-{port}.log"
            ports[name] = stack.enter_context(server(command, port, ready, log, env))
        for per_request in args.per_request:
            for concurrency in args.concurrency:
                limit = in_process_limit(bundle, texts, seconds=args.seconds / 2)
                best = max(limit, key=lambda b: limit[b]["texts_per_s"])
                results["in-process limit"][f"{per_request}x{concurrency}"] = {
                    "best_batch_size": best, **limit[best], "by_batch_size": limit}
                for name, (kind, *_rest) in setups.items():
                    path = "/invocations" if kind == "mlflow" else "/predict"
                    requests = build_requests(HOST, path, bodies_for(kind, texts, per_request))
                    load = run_load(HOST, ports[name], requests, concurrency, args.seconds)
                    results[name][f"{per_request}x{concurrency}"] = load.summary(per_request,
                                                                                  CORES)
                    print_row(name, per_request, concurrency,
                              results[name][f"{per_request}x{concurrency}"])
                print_row("in-process limit", per_request, concurrency,
                          results["in-process limit"][f"{per_request}x{concurrency}"])
    report(results, args)


def print_row(name: str, per_request: int, concurrency: int, r: dict) -> None:
    cpu = f"{r['client_cpu_share'] * 100:4.1f}%" if "client_cpu_share" in r else "   - "
    extra = f" (batch {r['best_batch_size']})" if "best_batch_size" in r else ""
    print(f"{name + extra:<36} {per_request:>3} text/req  c={concurrency:<4} "
          f"{r['texts_per_s']:8.1f} texts/s  p50 {r['p50_ms']:7.2f}  p95 {r['p95_ms']:7.2f}  "
          f"p99 {r['p99_ms']:7.2f} ms  errors {r.get('errors', 0):<4} client CPU {cpu}",
          flush=True)


def report(results: dict, args) -> None:
    def tps(name, key):
        return results.get(name, {}).get(key, {}).get("texts_per_s")

    ratios = {}
    for per_request, label in ((1, "1 text"), (16, "16 texts")):
        key = f"{per_request}x32"
        service, limit = tps("service, batching on", key), tps("in-process limit", key)
        if service and limit:
            ratios[f"2/1 ({label})"] = service / limit
    key = "1x32"
    if tps("naive FastAPI + PyTorch", key):
        ratios["2/4"] = tps("service, batching on", key) / tps("naive FastAPI + PyTorch", key)
    if tps("mlflow models serve", key):
        ratios["2/5"] = tps("service, batching on", key) / tps("mlflow models serve", key)
    p99 = results["service, batching on"].get(key, {}).get("p99_ms")
    print("\nAt concurrency 32:")
    for name, value in ratios.items():
        verdict = "meets" if value >= TARGETS[name] else "MISSES"
        print(f"  {name:<16} {value:5.2f}x   ({verdict} the target {TARGETS[name]}x)")
    if p99 is not None:
        print(f"  p99, 1 text     {p99:5.1f} ms ({'meets' if p99 <= 60 else 'MISSES'} the "
              "target 60 ms)")
    out = ROOT / "bench" / "results" / "serving.json"
    out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "args": vars(args),
        "results": results, "ratios_at_concurrency_32": ratios}, indent=2))
    print(f"\nwrote {out.relative_to(ROOT)}")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {CORES} cores, {platform.system()} {platform.release()}"


if __name__ == "__main__":
    main()
