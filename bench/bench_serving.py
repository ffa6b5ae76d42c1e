"""Serving benchmark: this service against the in-process limit and the alternatives.

    python bench/bench_serving.py [--seconds 5] [--concurrency 1 8 32 128]
                                  [--skip naive mlflow MLServer LitServe BentoML]   (make bench)

Measured in one run, interleaved (the machine's speed drifts over minutes: each point
is measured in every setting in order, then again in reverse order, half the time
each, and the halves added up), with
SST-2 dev texts, one text and 16 texts per request, loopback only:
  1. in-process limit: the same ONNX model called in-process, no HTTP, length-grouped
     batches of 1 to 64, in one process on every core and in one process per core
     (the best is kept);
  2. this service as deployed: one server process per core, micro-batching on (int8);
  3. this service, batching off;
  4. this service in one process (what it was before it used every core);
  5. naive baseline: FastAPI calling the PyTorch checkpoint once per request;
  6. `mlflow models serve` of the registered champion;
  7. the servers a user would pick instead, each wrapping the same int8 model and
     tokenizer with its own batching (bench/peers/): MLServer, LitServe, BentoML. A
     peer that cannot install or start is reported, with the reason, not dropped.
The service's and each peer's answers are checked against the bundle before they are
measured (the naive server and mlflow run the fp32/PyTorch model: not compared). Only
the server being measured runs; the others are stopped (SIGSTOP) meanwhile. Prints
throughput and p50/p95/p99 latency per setting, the load generator's CPU share, each
server's memory (PSS, per process) and idle CPU, and the ratios against the targets: the
service over the in-process limit and over each alternative at every point, and
batching on over batching off. Publishes bench/results/serving.json and
docs/results/serving.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib.metadata
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402
from loadgen import build_requests, run_load  # noqa: E402
from results import Plot, Result, Table, publish  # noqa: E402

from ops import control  # noqa: E402
from serving.bundle import Bundle, RuntimeOptions, softmax  # noqa: E402
from serving.engine.batcher import length_groups  # noqa: E402
from serving.settings import available_cores  # noqa: E402

CORES = available_cores()  # as the service counts them (affinity, CPU quota)
HOST = "127.0.0.1"
# Issue 14's targets: at concurrency 32, the service at 0.7x the in-process limit with
# one text per request (goal 0.85x) and 0.95x with 16.
TARGETS = {"2/1 (1 text)": 0.7, "2/1 (16 texts)": 0.95}
SERVICE = "service"
SERVICE_OFF = "service, batching off"
SERVICE_ONE = "service, 1 process"
NAIVE = "naive FastAPI + PyTorch"
MLFLOW = "mlflow models serve"
PEER_NAMES = set(peers.PEERS)


def dev_texts() -> list[str]:
    with gzip.open(ROOT / "data/external/sst2/dev.tsv.gz", "rt", encoding="utf-8") as f:
        return [line.split("\t")[0].strip() for line in f.read().splitlines()[1:]]


# ---------------------------------------------------------------- 1. in-process limit


_bundles: dict[tuple[str, int], Bundle] = {}  # per limit process: loaded once


def limit_run(bundle_dir: str, threads: int, texts: list[str], size: int, seconds: float,
              start_at: float) -> tuple[int, float, list[float]]:
    """In one process: tokenize + length-grouped ONNX calls on batches of `size`, for
    `seconds` from `start_at` (so that several processes run together); (texts done,
    seconds taken, latency per batch)."""
    key = (bundle_dir, threads)
    if key not in _bundles:
        _bundles[key] = Bundle.load(Path(bundle_dir), "int8",
                                    RuntimeOptions(intra_op_threads=threads))
    bundle = _bundles[key]
    time.sleep(max(0.0, start_at - time.time()))
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
    return count, time.perf_counter() - started, latencies


def in_process_limit(pools: dict[str, ProcessPoolExecutor], bundle_dir: Path,
                     texts: list[str], batch_sizes=(1, 4, 16, 64), seconds: float = 3.0
                     ) -> dict:
    """Texts per second of the model called in-process, no HTTP, for each batch size
    and two layouts: one process with onnxruntime on every core, and one process per
    core with one thread each (how the service runs it). The best of all is the limit."""
    results = {}
    for layout, pool in pools.items():
        processes, threads = (1, 0) if layout == "1 process" else (CORES, 1)
        for size in batch_sizes:
            start_at = time.time() + 0.5
            runs = [f.result() for f in [
                pool.submit(limit_run, str(bundle_dir), threads, texts, size, seconds,
                            start_at) for _ in range(processes)]]
            ms = np.concatenate([np.asarray(latencies) for _, _, latencies in runs]) * 1000
            results[f"{size}, {layout}"] = {
                "batch_size": size, "layout": layout,
                "texts_per_s": sum(count / elapsed for count, elapsed, _ in runs),
                "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                "p99_ms": float(np.percentile(ms, 99))}
    return results


# ---------------------------------------------------------------- the servers


@contextmanager
def server(command: list[str], port: int, ready_path: str, log: Path, env: dict | None = None):
    """Start `command`, wait until `ready_path` answers, yield (port, process), stop it."""
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})},
                               stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        try:
            control.wait_until(f"http://{HOST}:{port}{ready_path}", 180, process)
        except RuntimeError as err:
            raise RuntimeError(f"{command[:3]}: {err}: {log.read_text()[-2000:]}") from None
        yield port, process
    finally:
        control.stop(process)


def our_service(bundle_dir: Path, port: int, log: Path, settings: dict):
    """`server` for `python -m serving` on `bundle_dir`: a deep queue (the load must
    not be refused), the bundle not followed, and `settings` (TEXTOPS_*) on top."""
    env = {"TEXTOPS_BUNDLE": str(bundle_dir), "TEXTOPS_PORT": str(port),
           "TEXTOPS_MAX_QUEUE": "4096", "TEXTOPS_WATCH_INTERVAL_S": "0", **settings}
    return server([sys.executable, "-m", "serving"], port, "/health/ready", log, env)


def bodies_for(kind: str, texts: list[str], per_request: int) -> list[bytes]:
    chunks = [texts[i : i + per_request] for i in range(0, len(texts) - per_request + 1,
                                                        per_request)]
    if kind == "mlflow":
        return [json.dumps({"dataframe_split": {"columns": ["text"],
                                                "data": [[t] for t in c]}}).encode()
                for c in chunks]
    return [json.dumps({"texts": c}).encode() for c in chunks]


@dataclass
class Setup:
    """One server to measure: how to start it, what to send, how to read answers."""

    name: str
    version: str
    settings: dict
    path: str
    start: Callable[[int, Path], AbstractContextManager]  # (port, log) -> (port, process)
    bodies: Callable[[list[str], int], list[bytes]]
    parse: Callable[[bytes], list[list[float]]] | None = None  # None: not checked


def service_answers(body: bytes) -> list[list[float]]:
    return [list(p["probabilities"].values()) for p in json.loads(body)["predictions"]]


def our_setups(bundle_dir: Path, bundle: Bundle, checkpoint: str) -> list[Setup]:
    python = sys.executable
    version = f"textops (uvicorn {version_of('uvicorn')}, fastapi {version_of('fastapi')})"

    def service(settings: dict) -> Setup:
        def start(port: int, log: Path):
            # as deployed, prediction log on; a database of its own beside its log
            return our_service(bundle_dir, port, log, {
                "TEXTOPS_PREDICTION_LOG": f"sqlite:///{log.with_suffix('.db')}",
                **settings})
        workers = int(settings.get("TEXTOPS_WORKERS", "0")) or CORES
        shown = {"workers": workers, "batching": settings.get("TEXTOPS_BATCHING", "true"),
                 "prediction_log": "on (SQLite)",
                 "max_batch_size": 64, "max_wait_ms": 0.0,
                 "onnx_threads_per_worker": max(1, CORES // workers)}
        return Setup("", version, shown, "/predict", start,
                     lambda texts, n: bodies_for("service", texts, n), service_answers)

    on = service({"TEXTOPS_BATCHING": "true"})
    off = service({"TEXTOPS_BATCHING": "false"})
    alone = service({"TEXTOPS_BATCHING": "true", "TEXTOPS_WORKERS": "1"})
    on.name, off.name, alone.name = SERVICE, SERVICE_OFF, SERVICE_ONE
    naive = Setup(
        NAIVE, f"fastapi {version_of('fastapi')}, torch {version_of('torch')}",
        {"workers": 1, "batching": "none", "model": "PyTorch checkpoint, fp32"},
        "/predict",
        lambda port, log: server([python, "bench/naive_server.py", checkpoint,
                                  str(bundle_dir / "tokenizer.json"), str(port)],
                                 port, "/health", log, {"PYTHONPATH": str(ROOT)}),
        lambda texts, n: bodies_for("naive", texts, n))
    mlflow = Setup(
        MLFLOW, f"mlflow {version_of('mlflow')}",
        {"workers": 1, "batching": "none", "model": "registered pyfunc (this bundle)"},
        "/invocations",
        lambda port, log: server(
            [str(Path(python).parent / "mlflow"), "models", "serve", "-m",
             f"models:/{bundle.meta['model_name']}@champion", "--env-manager", "local",
             "-h", HOST, "-p", str(port)], port, "/ping", log,
            # it starts `uvicorn` from PATH: the venv's, not activated
            {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db",
             "PATH": f"{Path(python).parent}:{os.environ['PATH']}"}),
        lambda texts, n: bodies_for("mlflow", texts, n))
    return [on, off, alone, naive, mlflow]


def peer_setups(bundle_dir: Path, names: list[str]) -> tuple[list[Setup], dict[str, str]]:
    """The peers that installed, as setups, and why the others cannot run."""
    setups, unavailable = [], {}
    for peer in peers.prepare(names, cores=CORES):
        if isinstance(peer, peers.PeerUnavailable):
            unavailable[peer.name] = peer.reason
            continue

        def start(port: int, log: Path, peer=peer):
            return peer.running(bundle_dir, port, log, CORES)

        def parse(body: bytes, peer=peer) -> list[list[float]]:
            return [probabilities for _, probabilities in peer.parse(body)]

        setups.append(Setup(peer.name, f"{peer.name} {peer.version}", peer.settings,
                            peer.path, start, peer.bodies, parse))
    return setups, unavailable


def check_answers(setup: Setup, port: int, bundle: Bundle, texts: list[str]) -> None:
    """The server's probabilities for 16 texts equal the bundle's (int8 batching may
    move a probability by a rounding step); a wrong server is not worth measuring."""
    if setup.parse is None:
        return
    body = setup.bodies(texts[:16], 16)[0]
    request = urllib.request.Request(f"http://{HOST}:{port}{setup.path}", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        got = np.asarray(setup.parse(response.read()), dtype=np.float32)
    expected = bundle.predict_proba(texts[:16])
    if got.shape != expected.shape or np.abs(got - expected).max() > 0.02:
        raise RuntimeError(f"{setup.name}: its answers differ from the bundle's "
                           f"(shape {got.shape}, expected {expected.shape})")


def memory_mb(process: subprocess.Popen) -> list[float]:
    """Memory of the server and every process it started, MB each: the proportional
    set size (pages shared between forked processes counted once, split among them),
    so that a server that forks its workers is not charged twice for shared pages."""
    sizes = []
    for member in tree(process):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            sizes.append(member.memory_full_info().pss / 2**20)
    return sorted(sizes, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="models/current")
    parser.add_argument("--checkpoint", default="models/checkpoints/best.ckpt")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--per-request", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--skip", nargs="*", default=[],
                        help="setups left out: naive, mlflow, MLServer, LitServe, BentoML")
    args = parser.parse_args()

    bundle_dir = (ROOT / args.bundle).resolve()
    bundle = Bundle.load(bundle_dir, "int8")
    texts = dev_texts()
    logs = ROOT / "bench" / "results"
    logs.mkdir(parents=True, exist_ok=True)
    skip = {name.lower() for name in args.skip}
    setups = [s for s in our_setups(bundle_dir, bundle, args.checkpoint)
              if s.name.lower() not in skip and s.name.split()[0].strip(",").lower()
              not in skip]
    peer_names = [name for name in peers.PEERS if name.lower() not in skip]
    more, failed = peer_setups(bundle_dir, peer_names) if peer_names else ([], {})
    setups += more
    results: dict = {"in-process limit": {}, **{s.name: {} for s in setups}}
    memory: dict[str, list[float]] = {}
    with ExitStack() as stack:
        spawn = multiprocessing.get_context("spawn")
        pools = {layout: stack.enter_context(ProcessPoolExecutor(n, mp_context=spawn))
                 for layout, n in (("1 process", 1), (f"{CORES} processes", CORES))}
        ports, processes = {}, {}
        for setup in setups:
            port = control.free_port()
            log = logs / f"{setup.name.split()[0].lower().strip(',')}-{port}.log"
            try:
                ports[setup.name], processes[setup.name] = stack.enter_context(
                    setup.start(port, log))
                check_answers(setup, ports[setup.name], bundle, texts)
            except Exception as err:  # noqa: BLE001 - reported, and the others still run
                failed[setup.name] = f"{type(err).__name__}: {err}"[:2000]
                results.pop(setup.name)
        setups = [s for s in setups if s.name in results]
        idle = idle_cpu({name: processes[name] for name in results if name in processes})
        print_setups(setups, failed, idle)
        # Only the server being measured runs: one that polls while idle (see the idle
        # CPU above) would otherwise take the cores from the one under load.
        for process in processes.values():
            freeze(process)
        stack.callback(lambda: [thaw(process) for process in processes.values()])
        for per_request in args.per_request:
            for concurrency in args.concurrency:
                key = f"{per_request}x{concurrency}"
                limit = in_process_limit(pools, bundle_dir, texts, seconds=args.seconds / 2)
                best = max(limit.values(), key=lambda run: run["texts_per_s"])
                results["in-process limit"][key] = {**best, "all": limit}
                # Each setting is measured twice, half the time each, in order and
                # then in reverse order: a drift of the machine's speed over the
                # point weighs on every setting alike (A B C ... C B A).
                loads = {}
                for setup in [*setups, *reversed(setups)]:
                    requests = build_requests(HOST, setup.path,
                                              setup.bodies(texts, per_request))
                    members = {m.pid for m in tree(processes[setup.name])}
                    thaw(processes[setup.name])
                    load = run_load(HOST, ports[setup.name], requests, concurrency,
                                    args.seconds / 2)
                    freeze(processes[setup.name])
                    loads[setup.name] = loads[setup.name] + load if setup.name in loads \
                        else load
                    if members - {m.pid for m in tree(processes[setup.name])}:
                        # a worker died (or a supervisor replaced one): say so
                        results[setup.name].setdefault("processes_died", []).append(key)
                        print(f"  ! {setup.name}: a process of it ended during this point")
                for setup in setups:
                    results[setup.name][key] = loads[setup.name].summary(per_request, CORES)
                    print_row(setup.name, per_request, concurrency, results[setup.name][key])
                print_row("in-process limit", per_request, concurrency,
                          results["in-process limit"][key])
        for setup in setups:  # after the load: what each holds once warm
            memory[setup.name] = memory_mb(processes[setup.name])
    report(results, setups, failed, memory, idle, args)


def tree(process: subprocess.Popen) -> list[psutil.Process]:
    """The server and every process it started, the server first."""
    try:
        root = psutil.Process(process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def signal_all(members: list[psutil.Process], signal_number: int) -> None:
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal_number)


def freeze(process: subprocess.Popen) -> None:
    """SIGSTOP the server, then its workers (a supervisor stopped first cannot see a
    stopped worker as hung)."""
    signal_all(tree(process), signal.SIGSTOP)


def thaw(process: subprocess.Popen) -> None:
    """SIGCONT the workers first, so that a supervisor's pending health check finds
    them answering when it resumes."""
    signal_all(tree(process)[::-1], signal.SIGCONT)
    time.sleep(0.2)


def idle_cpu(processes: dict[str, subprocess.Popen], seconds: float = 5.0
             ) -> dict[str, float]:
    """Each server's CPU use while nobody sends it anything, in cores."""
    def cpu(members):
        total = 0.0
        for member in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += sum(member.cpu_times()[:2])
        return total

    trees = {name: tree(process) for name, process in processes.items()}
    before = {name: cpu(members) for name, members in trees.items()}
    time.sleep(seconds)
    return {name: (cpu(members) - before[name]) / seconds for name, members in trees.items()}


def print_setups(setups: list[Setup], failed: dict[str, str], idle: dict[str, float]
                 ) -> None:
    print("Setups (idle CPU: what each uses while nobody sends it anything):")
    for setup in setups:
        shown = ", ".join(f"{k} {v}" for k, v in setup.settings.items())
        print(f"  {setup.name:<26} {setup.version}, idle CPU "
              f"{idle.get(setup.name, 0) * 100:.1f}% of a core\n  {'':<26} {shown}")
    for name, reason in failed.items():
        print(f"  {name:<26} NOT MEASURED: {reason.splitlines()[0][:300]}")
    print(flush=True)


def print_row(name: str, per_request: int, concurrency: int, r: dict) -> None:
    cpu = f"{r['client_cpu_share'] * 100:4.1f}%" if "client_cpu_share" in r else "   - "
    extra = f" (batch {r['batch_size']}, {r['layout']})" if "layout" in r else ""
    print(f"{name + extra:<36} {per_request:>3} text/req  c={concurrency:<4} "
          f"{r['texts_per_s']:8.1f} texts/s  p50 {r['p50_ms']:7.2f}  p95 {r['p95_ms']:7.2f}  "
          f"p99 {r['p99_ms']:7.2f} ms  errors {r.get('errors', 0):<4} client CPU {cpu}",
          flush=True)


def report(results: dict, setups: list[Setup], failed: dict[str, str],
           memory: dict[str, list[float]], idle: dict[str, float], args) -> None:
    def tps(name, key):
        return results.get(name, {}).get(key, {}).get("texts_per_s")

    if SERVICE not in results:
        print(f"\nthe service did not start: {failed.get(SERVICE, '?')}")
        return
    keys = list(results["in-process limit"])
    print("\nThe service over each alternative, texts/s (ahead: > 1):")
    print(f"  {'':<26}" + "".join(f"{key:>9}" for key in keys))
    versus = {}
    for setup in setups:
        if setup.name == SERVICE:
            continue
        row = {key: tps(SERVICE, key) / tps(setup.name, key) for key in keys
               if tps(setup.name, key)}
        versus[setup.name] = row
        print(f"  {setup.name:<26}" + "".join(f"{row.get(key, 0):9.2f}" for key in keys))
    behind = [f"{name} at {key}" for name, row in versus.items() for key, ratio in row.items()
              if ratio <= 1 and name in PEER_NAMES | {SERVICE_OFF}]
    print("  ahead of every peer and of batching off at every point" if not behind else
          f"  NOT ahead: {', '.join(behind)}")

    ratios = {}
    for per_request, label in ((1, "1 text"), (16, "16 texts")):
        key = f"{per_request}x32"
        if tps(SERVICE, key) and tps("in-process limit", key):
            ratios[f"2/1 ({label})"] = tps(SERVICE, key) / tps("in-process limit", key)
    p99 = results[SERVICE].get("1x32", {}).get("p99_ms")
    print("\nAt concurrency 32:")
    for name, value in ratios.items():
        verdict = "meets" if value >= TARGETS[name] else "MISSES"
        print(f"  {name:<16} {value:5.2f}x   ({verdict} the target {TARGETS[name]}x)")
    if p99 is not None:
        print(f"  p99, 1 text     {p99:5.1f} ms ({'meets' if p99 <= 60 else 'MISSES'} the "
              "target 60 ms)")
    print("\nMemory once warm (PSS, MB per process):")
    for name, sizes in memory.items():
        print(f"  {name:<26} {sum(sizes):7.0f} in {len(sizes)} processes: "
              + ", ".join(f"{size:.0f}" for size in sizes))
    payload = {
        "args": vars(args),
        "setups": {s.name: {"version": s.version, "settings": s.settings} for s in setups},
        "not_measured": failed, "results": results, "memory_mb": memory,
        "idle_cpu_cores": idle,
        "service_over": versus, "ratios_at_concurrency_32": ratios}
    print(f"\nwrote {publish(as_result(payload)).relative_to(ROOT)}")


ABOUT = """SST-2 dev texts over loopback, one and sixteen texts per request, at several
concurrencies (`per request x concurrency`), against the same int8 model served by
the alternatives a user would pick (bench/peers/) and an in-process limit (the ONNX model
called without HTTP). Each point is measured in every setting in order, then in reverse
order, so that a drift of the machine's speed weighs on all alike; only the server under
load runs. Run again: `python bench/bench_serving.py` (`make bench`)."""


def as_result(payload: dict) -> Result:
    results, versus = payload["results"], payload["service_over"]
    keys = list(results["in-process limit"])
    throughput = Table("Texts per second (per request x concurrency)", ["setup", *keys],
                       [[name, *(round(point.get(key, {}).get("texts_per_s", 0)) for key in keys)]
                        for name, point in results.items()])
    latency = Table("p99 latency, ms", ["setup", *keys],
                    [[name, *(round(point.get(key, {}).get("p99_ms", 0), 1) for key in keys)]
                     for name, point in results.items() if name != "in-process limit"])
    ahead = Table(f"{SERVICE} over each alternative (texts/s ratio; ahead: > 1)",
                  ["alternative", *keys],
                  [[name, *(f"{row[key]:.2f}x" if key in row else "-" for key in keys)]
                   for name, row in versus.items()])
    memory = Table("Memory once warm (PSS, MB)", ["setup", "processes", "total MB"],
                   [[name, len(sizes), round(sum(sizes))]
                    for name, sizes in payload["memory_mb"].items()])
    tables = [throughput, latency, ahead, memory]
    if payload["not_measured"]:
        tables.append(Table("Not measured", ["setup", "why"],
                            [[name, why.splitlines()[0][:200]]
                             for name, why in payload["not_measured"].items()]))
    plot = Plot("Texts per second, 16 texts per request", "line", "concurrency", "texts/s",
                {name: [[int(key.split("x")[1]), point[key]["texts_per_s"]]
                        for key in keys if key.startswith("16x") and key in point]
                 for name, point in results.items()})
    summary = [[f"{SERVICE}, texts/s at 16 texts x 32 concurrent",
                round(results.get(SERVICE, {}).get("16x32", {}).get("texts_per_s", 0))]]
    measured = {name: row for name, row in versus.items() if name in PEER_NAMES and row}
    if measured:
        summary.append([f"{SERVICE} over {', '.join(sorted(measured))}, the least ratio",
                        f"{min(min(row.values()) for row in measured.values()):.2f}x"])
    return Result("serving", "Serving throughput against the alternatives", ABOUT, tables,
                  [plot], data=payload, summary=summary)


def version_of(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
