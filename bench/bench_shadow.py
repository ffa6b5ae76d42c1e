"""What shadow mode costs: the request path's p99 and the server's CPU with a
challenger in shadow against none, and the shadow's CPU against the challenger's own.

    python bench/bench_shadow.py [--bundle models/current] [--seconds 3] [--rounds 10]

Two services on the same bundle, both logging their predictions: one alone, one with
a challenger in shadow (the same model under another version, so a challenger of the
champion's size), loaded in turns at concurrency 32 with SST-2 dev texts, one text
per request. Per round: p99 latency, the server's CPU time (from /proc), and the texts
the shadow scored and dropped (/metrics). The shadow's CPU per scored text (the
server's CPU with shadow on, less what shadow off spends per answered text) is set
against the challenger's own inference CPU per text, measured in this process on the
same texts in batches of 64 (one onnxruntime thread, as it runs there). Targets: p99
within 10% of shadow off, shadow CPU per scored text at most 1.1x the challenger's
own. Publishes
bench/results/shadow.json and docs/results/shadow.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_logging import cpu_seconds  # noqa: E402
from bench_serving import CORES, HOST  # noqa: E402
from loadgen import build_requests, run_load  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from results import Result, Table, publish  # noqa: E402
from workload import bodies_for, dev_texts  # noqa: E402

from ops import control  # noqa: E402
from serving.bundle import Bundle, RuntimeOptions  # noqa: E402

P99_TARGET, CPU_TARGET = 1.10, 1.10
OFF, ON = "shadow off", "shadow on"


def own_cpu_per_text(bundle_dir: Path, texts: list[str], batch: int) -> float:
    """The challenger's inference CPU per text, in microseconds: one thread, batches
    of `batch` texts, best of three passes."""
    bundle = Bundle.load(bundle_dir, "int8", RuntimeOptions(intra_op_threads=1))
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        for i in range(0, len(texts), batch):
            bundle.predict_proba(texts[i:i + batch], batch_size=batch)
        best = min(best, (time.process_time() - started) / len(texts) * 1e6)
    return best


def shadow_counts(url: str) -> dict[str, float]:
    import httpx

    counts = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == "textops_shadow_texts_total":
                counts[sample.labels["outcome"]] = sample.value
    return counts


def challenger_copy(bundle: Path, where: Path) -> Path:
    copy = Path(shutil.copytree(bundle, where / "challenger"))
    meta = json.loads((copy / "bundle.json").read_text())
    (copy / "bundle.json").write_text(json.dumps({**meta, "version": "shadow-bench"}))
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default="models/current")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    bundle = (ROOT / args.bundle).resolve()
    logs = ROOT / "bench" / "results"
    texts = dev_texts()
    requests = build_requests(HOST, "/predict", bodies_for("service", texts, 1))
    p99 = {OFF: [], ON: []}
    cpu = {OFF: [], ON: []}
    on_rounds = []  # (server CPU seconds, texts answered, texts scored, texts dropped)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        challenger = challenger_copy(bundle, Path(tmp))
        services = {}
        for name, extra in ((OFF, {}), (ON, {"TEXTOPS_CHALLENGER": str(challenger)})):
            env = {"TEXTOPS_MAX_QUEUE": "4096", "TEXTOPS_WATCH_INTERVAL_S": "0",
                   "TEXTOPS_PREDICTION_LOG": f"sqlite:///{tmp}/{len(services)}.db", **extra}
            service = control.start(bundle, control.free_port(),
                                    logs / f"shadow-{len(services)}.log", env=env)
            stack.callback(control.stop, service.process)
            control.wait_ready(service.url, 180, service.process)
            services[name] = service
        for round_ in range(args.rounds):
            for name in (OFF, ON) if round_ % 2 == 0 else (ON, OFF):
                service = services[name]
                port = int(service.url.rsplit(":", 1)[1])
                before = cpu_seconds(service.process.pid)
                counted = shadow_counts(service.url) if name == ON else {}
                load = run_load(HOST, port, requests, args.concurrency, args.seconds,
                                warmup=0.5)
                used = cpu_seconds(service.process.pid) - before
                summary = load.summary(1, CORES)
                served = summary["texts_per_s"] * (args.seconds + 0.5)
                if name == ON:  # what it still holds is left out, its CPU mostly too
                    now = shadow_counts(service.url)
                    on_rounds.append((used, served, now["scored"] - counted["scored"],
                                      now["dropped"] - counted["dropped"]))
                p99[name].append(summary["p99_ms"])
                cpu[name].append(used / served * 1e6)
                print(f"round {round_ + 1:>2}  {name:<10} {summary['texts_per_s']:8.1f} "
                      f"texts/s  p99 {summary['p99_ms']:6.1f} ms  server CPU "
                      f"{cpu[name][-1]:6.1f} us/text  errors {summary['errors']}", flush=True)
        own = own_cpu_per_text(challenger, texts[:2000], batch=64)
    p99_ratio = statistics.median(p99[ON]) / statistics.median(p99[OFF])
    off_per_text = statistics.median(cpu[OFF]) / 1e6
    extra = statistics.median((used - off_per_text * served) / scored * 1e6
                              for used, served, scored, _ in on_rounds if scored)
    scored_share = (sum(r[2] for r in on_rounds)
                    / sum(r[2] + r[3] for r in on_rounds))
    payload = {"args": vars(args), "p99_ms": p99, "server_cpu_us_per_text": cpu,
               "p99_ratio": p99_ratio, "shadow_cpu_us_per_scored_text": extra,
               "scored_share": scored_share, "on_rounds": on_rounds,
               "challenger_own_cpu_us_per_text": own, "cpu_ratio": extra / own}
    print(f"p99 on/off {p99_ratio:.3f} (target <= {P99_TARGET}); the shadow scored "
          f"{scored_share:.1%} of the texts; its CPU {extra:.1f} us per scored text against "
          f"the challenger's own {own:.1f}: {extra / own:.2f}x (target <= {CPU_TARGET})")
    print(f"wrote {publish(as_result(payload)).relative_to(ROOT)}")


ABOUT = f"""Two services on the same bundle, both logging predictions, one with a
challenger in shadow (the same model under another version), loaded in turns at
concurrency 32 with SST-2 dev texts, one text per request. The p99 ratio is the
median p99 with shadow on over off (target at most {P99_TARGET}). The shadow runs at
the lowest CPU priority: on a saturated server it scores what the spare CPU allows and
drops the rest (counted), so the share it scored is given too. Its CPU per scored text
is the server's CPU with shadow on, less what shadow off spends per answered text,
over the texts it scored, against the challenger's own inference CPU per text on the
same texts in batches of 64 on one thread (target at most {CPU_TARGET}x). Run again:
`python bench/bench_shadow.py --bundle models/current`."""


def as_result(payload: dict) -> Result:
    p99, cpu = payload["p99_ms"], payload["server_cpu_us_per_text"]
    rows = [[name, round(statistics.median(p99[name]), 1),
             round(statistics.median(cpu[name]), 1)] for name in (OFF, ON)]
    table = Table(f"Median of {payload['args']['rounds']} rounds at concurrency "
                  f"{payload['args']['concurrency']}",
                  ["setting", "p99 (ms)", "server CPU per text (us)"], rows)
    costs = Table("Shadow mode's cost", ["measure", "value", "target"], [
        ["p99, shadow on / off", f"{payload['p99_ratio']:.3f}", f"<= {P99_TARGET}"],
        ["texts the shadow scored (the rest dropped, counted)",
         f"{payload['scored_share']:.1%}", ""],
        ["shadow CPU per scored text (us)",
         round(payload["shadow_cpu_us_per_scored_text"], 1), ""],
        ["the challenger's own inference CPU per text (us)",
         round(payload["challenger_own_cpu_us_per_text"], 1), ""],
        ["shadow CPU / the challenger's own", f"{payload['cpu_ratio']:.2f}",
         f"<= {CPU_TARGET}"]])
    summary = [["shadow mode: p99 on / off at concurrency 32", f"{payload['p99_ratio']:.3f}"],
               ["shadow mode: CPU / the challenger's own inference",
                f"{payload['cpu_ratio']:.2f}x"]]
    return Result("shadow", "What shadow mode costs", ABOUT, [table, costs], data=payload,
                  summary=summary)


if __name__ == "__main__":
    main()
