"""Where a request's time goes in the running service: py-spy under load.

    python bench/profile_serving.py [--bundle models/current] [--seconds 10]
                                    [--concurrency 32] [--per-request 1]
                                    [--env TEXTOPS_WORKERS=1 ...]

Starts the service on the bundle, drives it with the benchmark's load generator and
workload (texts, or images as base64 PNG, as the bundle takes) and samples every
server process with py-spy (non-blocking, so the service runs at full speed while
sampled). Prints the functions that hold the most samples, by own time and by
inclusive time, as shares of all samples, and writes the collapsed stacks to
bench/results/profile-<settings>.txt (open them in speedscope or turn them into a
flame graph with inferno/flamegraph.pl).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_serving import HOST, our_service  # noqa: E402
from loadgen import build_requests, run_load  # noqa: E402
from workload import for_bundle  # noqa: E402

from ops import control  # noqa: E402
from serving.bundle import Bundle  # noqa: E402

IDLE = ("select", "epoll", "poll", "wait", "sleep", "_worker", "get", "acquire")


def profile(pid: int, seconds: float, out: Path) -> None:
    py_spy = Path(sys.executable).parent / "py-spy"  # the venv's (pyproject's dev extra)
    subprocess.run([str(py_spy), "record", "--pid", str(pid), "--subprocesses",
                    "--nonblocking", "--rate", "250", "--duration", str(int(seconds)),
                    "--format", "raw", "--output", str(out)], check=True, capture_output=True)


def busy(frames: list[str]) -> bool:
    """False for a thread that only waits (an idle pool thread, the event loop in
    epoll): their samples say nothing about the cost of a request."""
    leaf = frames[-1].split(" (")[0]
    return not any(leaf == name or leaf.endswith(name) for name in IDLE)


def summarise(collapsed: Path, top: int) -> None:
    own, inclusive, total = Counter(), Counter(), 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f for f in stack.split(";") if not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames or not busy(frames):
            continue
        samples = int(count)
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    print(f"\n{total} busy samples")
    for title, counts in (("own time", own), ("inclusive time", inclusive)):
        print(f"\ntop {top} by {title}:")
        for frame, samples in counts.most_common(top):
            print(f"  {samples / total * 100:5.1f}%  {frame[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="models/current")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--per-request", type=int, default=1)
    parser.add_argument("--env", nargs="*", default=[], help="extra TEXTOPS_* settings")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    port = control.free_port()
    settings = {"TEXTOPS_PREDICTION_LOG": "", **dict(item.split("=", 1) for item in args.env)}
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    name = "-".join([f"{args.per_request}x{args.concurrency}",
                     *(item.replace("TEXTOPS_", "").lower() for item in args.env)])
    collapsed = results / f"profile-{name}.txt"
    bundle_dir = (ROOT / args.bundle).resolve()
    workload = for_bundle(Bundle.load(bundle_dir, "int8"))  # texts, or images as PNG
    requests = build_requests(HOST, "/predict", workload.bodies("service", workload.items,
                                                                args.per_request))
    with our_service(bundle_dir, port, results / f"profile-{port}.log",
                     settings) as (port, process):
        load = threading.Thread(target=run_load, args=(HOST, port, requests,
                                                       args.concurrency,
                                                       args.seconds + 2, 1.0))
        load.start()
        profile(process.pid, args.seconds, collapsed)
        load.join()
    print(f"wrote {collapsed.relative_to(ROOT)}")
    summarise(collapsed, args.top)


if __name__ == "__main__":
    main()
