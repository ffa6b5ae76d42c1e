"""Serving benchmark: this service against the in-process limit and the alternatives.

    python bench/bench_serving.py [--bundle models/current] [--seconds 5]
                                  [--concurrency 1 8 32 128] [--per-request 1 16]
                                  [--skip naive mlflow MLServer LitServe BentoML]   (make bench)

The bundle says what is sent (bench/workload.py): a text bundle gets SST-2 dev texts
and publishes `serving`; an image bundle gets Fashion-MNIST test images, PNG files in
base64, and publishes `serving_images` (no naive baseline: it serves text only).
Measured in one run, interleaved (the machine's speed drifts over minutes: each point
is measured in every setting in order, then again in reverse order, half the time
each, and the halves added up), with one item and 16 items per request, loopback only:
  1. in-process limit: the same work as the service minus HTTP (texts: tokenizing and
     length-grouped ONNX calls; images: base64 and PNG decoding, one ONNX call), on
     batches of 1 to 64, in one process on every core and in one process per core
     (the best is kept);
  2. this service as deployed: one server process per core, micro-batching on (int8);
  3. this service, batching off;
  4. this service in one process (what it was before it used every core);
  4b. the HTTP floor: uvicorn as the service runs it, a bare ASGI app answering a
     fixed body (bench/http_floor.py; the service's /predict is a plain ASGI handler
     too): what HTTP alone allows beside this load generator;
  5. naive baseline: FastAPI calling the PyTorch checkpoint once per request;
  6. `mlflow models serve` of the registered champion;
  7. the servers a user would pick instead, each wrapping the same int8 model and
     preprocessing with its own batching (bench/peers/): MLServer, LitServe, BentoML. A
     peer that cannot install or start is reported, with the reason, not dropped.
The service's and each peer's answers are checked against the bundle before they are
measured (the naive server and mlflow run the fp32/PyTorch model: not compared). Only
the server being measured runs; the others are stopped (SIGSTOP) meanwhile. Prints
throughput and p50/p95/p99 latency per setting, the load generator's CPU share, each
server's memory (PSS, per process) and idle CPU, and the ratios against the targets: the
service over the in-process limit and over each alternative at every point, and
batching on over batching off. Publishes bench/results/<serving|serving_images>.json
and docs/results/<the same>.md.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.metadata
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402
from loadgen import build_requests, run_load  # noqa: E402
from processes import freeze, idle_cpu, memory_mb, thaw, tree  # noqa: E402
from results import Plot, Result, Table, publish  # noqa: E402
from workload import Workload, for_bundle  # noqa: E402

from ops import control  # noqa: E402
from pipeline.tracking.lineage import digest  # noqa: E402
from serving.bundle import Bundle, RuntimeOptions  # noqa: E402
from serving.settings import available_cores  # noqa: E402

CORES = available_cores()  # as the service counts them (affinity, CPU quota)
HOST = "127.0.0.1"
SERVICE = "service"
SERVICE_OFF = "service, batching off"
SERVICE_ONE = "service, 1 process"
NAIVE = "naive FastAPI + PyTorch"
MLFLOW = "mlflow models serve"
HTTP_FLOOR = "HTTP floor: uvicorn, a fixed answer"
PEER_NAMES = set(peers.PEERS)


# ---------------------------------------------------------------- 1. in-process limit


_bundles: dict[tuple[str, int], Bundle] = {}  # per limit process: loaded once


def limit_run(bundle_dir: str, threads: int, workload: Workload, size: int, seconds: float,
              start_at: float) -> tuple[int, float, list[float]]:
    """In one process: the workload's batches of `size` (texts: tokenize + length-grouped
    ONNX calls), for `seconds` from `start_at` (so that several processes run together);
    (items done, seconds taken, latency per batch)."""
    key = (bundle_dir, threads)
    if key not in _bundles:
        _bundles[key] = Bundle.load(Path(bundle_dir), "int8",
                                    RuntimeOptions(intra_op_threads=threads))
    bundle = _bundles[key]
    time.sleep(max(0.0, start_at - time.time()))
    count, started, latencies = 0, time.perf_counter(), []
    while time.perf_counter() - started < seconds:
        for start in range(0, len(workload.items), size):
            chunk = workload.items[start : start + size]
            t0 = time.perf_counter()
            workload.batch(bundle, chunk)
            latencies.append(time.perf_counter() - t0)
            count += len(chunk)
    return count, time.perf_counter() - started, latencies


def in_process_limit(pools: dict[str, ProcessPoolExecutor], bundle_dir: Path,
                     workload: Workload, batch_sizes=(1, 4, 16, 64), seconds: float = 3.0
                     ) -> dict:
    """Items per second of the model called in-process, no HTTP, for each batch size
    and two layouts: one process with onnxruntime on every core, and one process per
    core with one thread each (how the service runs it). The best of all is the limit."""
    results = {}
    for layout, pool in pools.items():
        processes, threads = (1, 0) if layout == "1 process" else (CORES, 1)
        for size in batch_sizes:
            start_at = time.time() + 0.5
            runs = [f.result() for f in [
                pool.submit(limit_run, str(bundle_dir), threads, workload, size, seconds,
                            start_at) for _ in range(processes)]]
            ms = np.concatenate([np.asarray(latencies) for _, _, latencies in runs]) * 1000
            results[f"{size}, {layout}"] = {
                "batch_size": size, "layout": layout,
                workload.rate: sum(count / elapsed for count, elapsed, _ in runs),
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


@dataclass
class Setup:
    """One server to measure: how to start it, what to send, how to read answers."""

    name: str
    version: str
    settings: dict
    path: str
    start: Callable[[int, Path], AbstractContextManager]  # (port, log) -> (port, process)
    bodies: Callable[[list, int], list[bytes]]  # (items, per request) -> bodies
    parse: Callable[[bytes], list[list[float]]] | None = None  # None: not checked


def service_answers(body: bytes) -> list[list[float]]:
    return [list(p["probabilities"].values()) for p in json.loads(body)["predictions"]]


def our_setups(bundle_dir: Path, bundle: Bundle, checkpoint: str, workload: Workload
               ) -> list[Setup]:
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
                     lambda items, n: workload.bodies("service", items, n), service_answers)

    on = service({"TEXTOPS_BATCHING": "true"})
    off = service({"TEXTOPS_BATCHING": "false"})
    alone = service({"TEXTOPS_BATCHING": "true", "TEXTOPS_WORKERS": "1"})
    on.name, off.name, alone.name = SERVICE, SERVICE_OFF, SERVICE_ONE
    def naive_server(port: int, log: Path):
        # the baseline must be this bundle's model: the checkpoint it was exported from
        made_from = bundle.meta.get("lineage", {}).get("checkpoint_sha256")
        if digest(Path(checkpoint)) != made_from:
            raise RuntimeError(f"{checkpoint} is not the checkpoint this bundle was "
                               "exported from (its lineage's checkpoint_sha256)")
        return server([python, "bench/naive_server.py", checkpoint,
                       str(bundle_dir / "tokenizer.json"), str(port)],
                      port, "/health", log, {"PYTHONPATH": str(ROOT)})

    def mlflow_server(port: int, log: Path):
        # the registered champion when it is this bundle, else this bundle as a pyfunc
        from bench_batch_predict import pyfunc_model  # it imports this module

        saved = Path(tempfile.mkdtemp(prefix="bench-mlflow-"))
        atexit.register(shutil.rmtree, saved, ignore_errors=True)
        model, env, _ = pyfunc_model(bundle_dir, bundle.meta, saved)
        return server([str(Path(python).parent / "mlflow"), "models", "serve", "-m", model,
                       "--env-manager", "local", "-h", HOST, "-p", str(port)],
                      port, "/ping", log,
                      # it starts `uvicorn` from PATH: the venv's, not activated
                      {**env, "PATH": f"{Path(python).parent}:{os.environ['PATH']}"})

    naive = Setup(
        NAIVE, f"fastapi {version_of('fastapi')}, torch {version_of('torch')}",
        {"workers": 1, "batching": "none", "model": "PyTorch checkpoint, fp32"},
        "/predict", naive_server, lambda items, n: workload.bodies("naive", items, n))
    mlflow = Setup(
        MLFLOW, f"mlflow {version_of('mlflow')}",
        {"workers": 1, "batching": "none", "model": "pyfunc of this bundle (the registered "
         "champion when it is this bundle)"},
        "/invocations", mlflow_server, lambda items, n: workload.bodies("mlflow", items, n))
    floor = Setup(  # what HTTP alone costs here (bench/http_floor.py)
        HTTP_FLOOR, f"a bare ASGI app (uvicorn {version_of('uvicorn')})",
        {"workers": CORES, "work": "none: reads the body, fixed answer"},
        "/predict",
        lambda port, log: server([python, "bench/http_floor.py", str(port), str(CORES)],
                                 port, "/health", log, {"PYTHONPATH": str(ROOT / "bench")}),
        lambda items, n: workload.bodies("service", items, n))
    ours = [on, off, alone, floor]
    return [*ours, naive, mlflow] if workload.naive else [*ours, mlflow]


def peer_setups(bundle_dir: Path, names: list[str], workload: Workload
                ) -> tuple[list[Setup], dict[str, str]]:
    """The peers that installed, as setups, and why the others cannot run."""
    setups, unavailable = [], {}
    for peer in peers.prepare(names, cores=CORES, items=workload.key):
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


def check_answers(setup: Setup, port: int, bundle: Bundle, workload: Workload) -> None:
    """The server's probabilities for 16 items equal the bundle's (int8 batching may
    move a probability by a rounding step); a wrong server is not worth measuring."""
    if setup.parse is None:
        return
    body = setup.bodies(workload.items[:16], 16)[0]
    request = urllib.request.Request(f"http://{HOST}:{port}{setup.path}", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        got = np.asarray(setup.parse(response.read()), dtype=np.float32)
    expected = workload.expected(bundle, workload.items[:16])
    if got.shape != expected.shape or np.abs(got - expected).max() > 0.02:
        raise RuntimeError(f"{setup.name}: its answers differ from the bundle's "
                           f"(shape {got.shape}, expected {expected.shape})")


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
    workload = for_bundle(bundle)
    logs = ROOT / "bench" / "results"
    logs.mkdir(parents=True, exist_ok=True)
    skip = {name.lower() for name in args.skip}
    setups = [s for s in our_setups(bundle_dir, bundle, args.checkpoint, workload)
              if s.name.lower() not in skip and s.name.split()[0].strip(",").lower()
              not in skip]
    peer_names = [name for name in peers.PEERS if name.lower() not in skip]
    more, failed = peer_setups(bundle_dir, peer_names, workload) if peer_names else ([], {})
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
                check_answers(setup, ports[setup.name], bundle, workload)
            except Exception as err:  # noqa: BLE001 - reported, and the others still run
                failed[setup.name] = f"{type(err).__name__}: {err}"[:2000]
                results.pop(setup.name)
        setups = [s for s in setups if s.name in results]
        idle = idle_cpu({name: processes[name] for name in results if name in processes})
        print_setups(setups, failed, idle, workload)
        # Only the server being measured runs: one that polls while idle (see the idle
        # CPU above) would otherwise take the cores from the one under load.
        for process in processes.values():
            freeze(process)
        stack.callback(lambda: [thaw(process) for process in processes.values()])
        for per_request in args.per_request:
            for concurrency in args.concurrency:
                key = f"{per_request}x{concurrency}"
                limit = in_process_limit(pools, bundle_dir, workload, seconds=args.seconds / 2)
                best = max(limit.values(), key=lambda run: run[workload.rate])
                results["in-process limit"][key] = {**best, "all": limit}
                # Each setting is measured twice, half the time each, in order and
                # then in reverse order: a drift of the machine's speed over the
                # point weighs on every setting alike (A B C ... C B A).
                loads = {}
                for setup in [*setups, *reversed(setups)]:
                    requests = build_requests(HOST, setup.path,
                                              setup.bodies(workload.items, per_request))
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
                    results[setup.name][key] = loads[setup.name].summary(
                        per_request, CORES, workload.rate)
                    print_row(setup.name, per_request, concurrency, results[setup.name][key],
                              workload)
                print_row("in-process limit", per_request, concurrency,
                          results["in-process limit"][key], workload)
        for setup in setups:  # after the load: what each holds once warm
            memory[setup.name] = memory_mb(processes[setup.name])
    report(results, setups, failed, memory, idle, args, workload)


def print_setups(setups: list[Setup], failed: dict[str, str], idle: dict[str, float],
                 workload: Workload) -> None:
    print("Setups (idle CPU: what each uses while nobody sends it anything):")
    for setup in setups:
        shown = ", ".join(f"{k} {v}" for k, v in setup.settings.items())
        print(f"  {setup.name:<26} {setup.version}, idle CPU "
              f"{idle.get(setup.name, 0) * 100:.1f}% of a core\n  {'':<26} {shown}")
    for name, reason in failed.items():
        print(f"  {name:<26} NOT MEASURED: {reason.splitlines()[0][:300]}")
    if not workload.naive:
        print(f"  {NAIVE:<26} left out: it serves the PyTorch text checkpoint only")
    print(flush=True)


def print_row(name: str, per_request: int, concurrency: int, r: dict, workload: Workload
              ) -> None:
    cpu = f"{r['client_cpu_share'] * 100:4.1f}%" if "client_cpu_share" in r else "   - "
    extra = f" (batch {r['batch_size']}, {r['layout']})" if "layout" in r else ""
    print(f"{name + extra:<36} {per_request:>3} {workload.noun}/req  c={concurrency:<4} "
          f"{r[workload.rate]:8.1f} {workload.plural}/s  p50 {r['p50_ms']:7.2f}  "
          f"p95 {r['p95_ms']:7.2f}  "
          f"p99 {r['p99_ms']:7.2f} ms  errors {r.get('errors', 0):<4} client CPU {cpu}",
          flush=True)


def report(results: dict, setups: list[Setup], failed: dict[str, str],
           memory: dict[str, list[float]], idle: dict[str, float], args,
           workload: Workload) -> None:
    def tps(name, key):
        return results.get(name, {}).get(key, {}).get(workload.rate)

    if SERVICE not in results:
        print(f"\nthe service did not start: {failed.get(SERVICE, '?')}")
        return
    keys = list(results["in-process limit"])
    print(f"\nThe service over each alternative, {workload.plural}/s (ahead: > 1):")
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
    for per_request in (1, 16):
        key = f"{per_request}x32"
        if tps(SERVICE, key) and tps("in-process limit", key):
            ratios[f"2/1 ({workload.count(per_request)})"] = (
                tps(SERVICE, key) / tps("in-process limit", key))
        if tps(HTTP_FLOOR, key) and tps("in-process limit", key):
            # what HTTP alone allows against the limit, and the service's share of it
            ratios[f"floor/1 ({workload.count(per_request)})"] = (
                tps(HTTP_FLOOR, key) / tps("in-process limit", key))
            ratios[f"2/floor ({workload.count(per_request)})"] = (
                tps(SERVICE, key) / tps(HTTP_FLOOR, key))
    p99 = results[SERVICE].get("1x32", {}).get("p99_ms")
    print("\nAt concurrency 32:")
    for name, value in ratios.items():
        target = workload.targets.get(name)
        verdict = "no target" if target is None else (
            f"{'meets' if value >= target else 'MISSES'} the target {target}x")
        print(f"  {name:<16} {value:5.2f}x   ({verdict})")
    if p99 is not None:
        target = workload.p99_target_ms
        verdict = "" if target is None else (
            f" ({'meets' if p99 <= target else 'MISSES'} the target {target} ms)")
        print(f"  {'p99, ' + workload.count(1):<16}{p99:5.1f} ms{verdict}")
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
    print(f"\nwrote {publish(as_result(payload, workload)).relative_to(ROOT)}")


def as_result(payload: dict, workload: Workload) -> Result:
    results, versus = payload["results"], payload["service_over"]
    keys, rate, units = list(results["in-process limit"]), workload.rate, workload.plural
    throughput = Table(f"{units.capitalize()} per second (per request x concurrency)",
                       ["setup", *keys],
                       [[name, *(round(point.get(key, {}).get(rate, 0)) for key in keys)]
                        for name, point in results.items()])
    latency = Table("p99 latency, ms", ["setup", *keys],
                    [[name, *(round(point.get(key, {}).get("p99_ms", 0), 1) for key in keys)]
                     for name, point in results.items() if name != "in-process limit"])
    ahead = Table(f"{SERVICE} over each alternative ({units}/s ratio; ahead: > 1)",
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
    shown = workload.headline  # items per request
    plot = Plot(f"{units.capitalize()} per second, {workload.count(shown)} per request", "line",
                "concurrency", f"{units}/s",
                {name: [[int(key.split("x")[1]), point[key][rate]]
                        for key in keys if key.startswith(f"{shown}x") and key in point]
                 for name, point in results.items()})
    summary = [[f"{SERVICE}, {units}/s at {workload.count(shown)} x 32 concurrent",
                round(results.get(SERVICE, {}).get(f"{shown}x32", {}).get(rate, 0))]]
    measured = {name: row for name, row in versus.items() if name in PEER_NAMES and row}
    if measured:
        summary.append([f"{SERVICE} over {', '.join(sorted(measured))}, the least ratio",
                        f"{min(min(row.values()) for row in measured.values()):.2f}x"])
    return Result(workload.result, workload.title, workload.about, tables, [plot],
                  data=payload, summary=summary)


def version_of(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
