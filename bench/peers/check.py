"""A quick check of the serving peers (seconds per peer, no load test):

    python bench/peers/check.py [--bundle models/current] [--peers MLServer LitServe BentoML]
                                [--cores N]

For each peer: install or reuse its venv, start it on a free loopback port, send a few
requests of 1 and of 16 items one at a time, then 32 requests of one item at once;
every answer's labels and probabilities must equal `infer(Bundle.load(bundle,
"int8"), items)` within 1e-4. The items are what the bundle takes: SST-2 dev texts, or
for an image bundle Fashion-MNIST test images as base64 PNG files (decoded with the
bundle's `inputs.pixels` before `infer`, as the wrappers do). The wrappers report
each model call's size in their log (TEXTOPS_PEER_LOG_BATCHES=1, set only here), which
shows both batching paths taken: a request alone in its model call, and requests
grouped into one. After the stop, no process of the peer's venv may be left and its
port must be closed. One line per peer: its version, settings and OK, or what failed.
Logs: build/peers/<peer>/check.log.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import socket
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.peers import BUILD, HOST, PeerServer, PeerUnavailable, free_port, prepare  # noqa: E402
from bench.workload import ImageWorkload  # noqa: E402
from serving.bundle import Bundle  # noqa: E402
from serving.engine.inference import infer  # noqa: E402

TOLERANCE = 1e-4
BATCH_LINE = re.compile(rb"textops-batch texts=(\d+)")
FALLBACK_TEXTS = [
    "a gripping, beautifully acted film", "dull and far too long", "it was fine, i guess",
    "the best thing i have seen this year", "a mess from start to finish",
    "charming, funny and warm", "i wanted my two hours back", "an uneven but bold debut",
]


def sample_items(bundle: Bundle, count: int = 48) -> list[str]:
    """Items as a client sends them: texts, or base64 PNG files for an image bundle."""
    if bundle.task.items == "images":
        return ImageWorkload.load(count).items
    return sample_texts(count)


def sample_texts(count: int = 48) -> list[str]:
    dev = ROOT / "data/external/sst2/dev.tsv.gz"
    if dev.is_file():
        with gzip.open(dev, "rt", encoding="utf-8") as f:
            texts = [line.split("\t")[0].strip() for line in f.read().splitlines()[1:]]
        return texts[:count]
    return (FALLBACK_TEXTS * (count // len(FALLBACK_TEXTS) + 1))[:count]


def post(url: str, body: bytes, timeout: float = 30) -> bytes:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def compare(peer: PeerServer, body: bytes, items: list[str], bundle: Bundle) -> None:
    """Raise AssertionError unless the answer matches the in-process probabilities."""
    answer = peer.parse(body)
    if bundle.task.items == "images":
        probs, _stats = infer(bundle, list(bundle.inputs.pixels(ImageWorkload.files(items))))
    else:
        probs, _stats = infer(bundle, items)
    if len(answer) != len(items):
        raise AssertionError(f"{len(answer)} answers for {len(items)} items")
    for i, (label, got) in enumerate(answer):
        want = probs[i]
        if len(got) != len(want):
            raise AssertionError(f"item {i}: {len(got)} probabilities, want {len(want)}")
        worst = max(abs(float(g) - float(w)) for g, w in zip(got, want, strict=True))
        if worst > TOLERANCE:
            raise AssertionError(f"item {i}: probabilities differ by {worst:.2e}")
        if label != bundle.label_names[int(want.argmax())]:
            raise AssertionError(f"item {i}: label {label!r}, want "
                                 f"{bundle.label_names[int(want.argmax())]!r}")


def batch_sizes(log: Path, offset: int) -> list[int]:
    return [int(m) for m in BATCH_LINE.findall(log.read_bytes()[offset:])]


def leftovers(peer: PeerServer) -> list[str]:
    """Processes still running from the peer's venv."""
    venv = str(peer.python.parent.parent)
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if venv in cmdline:
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def check(peer: PeerServer, bundle: Bundle, bundle_dir: Path, items: list[str],
          cores: int) -> str:
    log = BUILD / peer.key / "check.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    port = free_port()
    url = f"http://{HOST}:{port}{peer.path}"
    os.environ["TEXTOPS_PEER_LOG_BATCHES"] = "1"
    started = time.monotonic()
    try:
        with peer.running(bundle_dir, port, log, cores):
            ready_s = time.monotonic() - started
            # one at a time: each request is alone in its model call
            offset = log.stat().st_size
            for per_request, count in ((1, 4), (16, 2)):
                chunks = [items[i * per_request : (i + 1) * per_request] for i in range(count)]
                for chunk, body in zip(chunks, peer.bodies(items, per_request), strict=False):
                    compare(peer, post(url, body), chunk, bundle)
            time.sleep(0.3)  # the log lines of workers of other processes come through
            alone = batch_sizes(log, offset)
            # 32 at once: some must share a model call
            offset = log.stat().st_size
            bodies = peer.bodies(items[:32], 1)
            with ThreadPoolExecutor(32) as pool:
                answers = list(pool.map(lambda b: post(url, b), bodies))
            for i, body in enumerate(answers):
                compare(peer, body, [items[i]], bundle)
            time.sleep(0.3)
            together = batch_sizes(log, offset)
    except Exception as err:  # noqa: BLE001 - reported on the peer's line
        return f"FAILED: {type(err).__name__}: {err}"
    finally:
        os.environ.pop("TEXTOPS_PEER_LOG_BATCHES", None)
    problems = []
    if 1 not in alone:
        problems.append(f"no model call of a single item seen (sizes {alone})")
    if not any(size > 1 for size in together):
        problems.append(f"32 concurrent requests were never grouped (sizes {together})")
    if port_open(port):
        problems.append(f"port {port} still open after the stop")
    left = leftovers(peer)
    if left:
        problems.append(f"processes left behind: {left}")
    if problems:
        return "FAILED: " + "; ".join(problems)
    return (f"OK (ready in {ready_s:.1f} s; model calls one at a time {alone}, "
            f"under 32 concurrent requests {sorted(together, reverse=True)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="models/current")
    parser.add_argument("--peers", nargs="*", default=None)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    bundle_dir = (ROOT / args.bundle).resolve()
    bundle = Bundle.load(bundle_dir, "int8")
    items = sample_items(bundle)
    failed = False
    for peer in prepare(args.peers, cores=args.cores, items=bundle.task.items):
        if isinstance(peer, PeerUnavailable):
            print(f"{peer.name}: UNAVAILABLE: {peer.reason}", flush=True)
            failed = True
            continue
        verdict = check(peer, bundle, bundle_dir, items, args.cores)
        failed |= not verdict.startswith("OK")
        print(f"{peer.name} {peer.version} {json.dumps(peer.settings)}: {verdict}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
