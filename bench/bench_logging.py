"""What the prediction log costs: the service's throughput with the log on and off.

    python bench/bench_logging.py [--bundle models/current] [--seconds 5] [--rounds 5]

Three services on the same bundle, one with the prediction log off, one logging every
answer to SQLite and one logging to SQLite encrypted (TEXTOPS_PREDICTION_LOG_KEYS,
serving/predlog/crypto.py; optionally a fourth on PostgreSQL: --postgres URL), loaded
in turns (off, on, on, off, ...: the machine's speed drifts over minutes) at
concurrency 32 with SST-2 dev texts, one text per request. Prints texts/s per round,
the median ratio on/off against the target (the log costs at most 5%), the median
ratio encrypted/plain log against the same target (encryption costs at most 5%), and
what the log wrote and dropped: a log that dropped entries would look cheap.

Throughput moves with whatever else the machine runs; the server's own CPU time per
text (user + system, all its threads and its child processes, from /proc, until its
log has written what the load gave it) moves much less, so it is printed beside it: on
a saturated server, throughput falls as CPU per text rises. Only the service under
load runs; the others are stopped (SIGSTOP), so that one's log writer does not work in
another's window.
Publishes bench/results/logging.json and docs/results/logging.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_serving import CORES, HOST  # noqa: E402
from loadgen import build_requests, run_load  # noqa: E402
from processes import freeze, thaw  # noqa: E402
from results import Result, Table, publish  # noqa: E402
from workload import bodies_for, dev_texts  # noqa: E402

from ops import control  # noqa: E402

TARGET_COST = 0.05
PLAIN, ENCRYPTED = "log on, SQLite", "log on, SQLite, encrypted"
TICK = 1 / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) and of its living
    children (the log's normalizing process)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) * TICK
    children = []  # each thread's: a process started from a thread is listed under it
    for thread in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += (thread / "children").read_text().split()
        except FileNotFoundError:  # it ended meanwhile
            pass
    for child in children:
        try:
            total += cpu_seconds(int(child))
        except FileNotFoundError:  # it exited meanwhile
            pass
    return total


def counters(port: int) -> dict[str, float]:
    """The prediction log's counters from the service's /metrics."""
    text = httpx.get(f"http://{HOST}:{port}/metrics").text
    wanted = {"textops_prediction_log_written_total": "written",
              "textops_prediction_log_dropped_total": "dropped"}
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                key = wanted[sample.name]
                if "reason" in sample.labels:
                    key += f" ({sample.labels['reason']})"
                found[key] = sample.value
    return found


def until_steady(read, interval: float, timeout: float = 30) -> None:
    """Wait until `read()` gives the same twice, `interval` seconds apart (a service's
    counters: its background work has caught up), for at most `timeout` seconds."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        now = read()
        if now == last:
            return
        last = now
        time.sleep(interval)


def settled(port: int) -> None:
    """Wait until the log's counters stand still: it has written what it was given."""
    until_steady(lambda: counters(port), 0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="models/current")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--postgres", help="also measure a log on this PostgreSQL URL")
    args = parser.parse_args()

    bundle = (ROOT / args.bundle).resolve()
    logs = ROOT / "bench" / "results"
    logs.mkdir(parents=True, exist_ok=True)
    requests = build_requests(HOST, "/predict", bodies_for("service", dev_texts(), 1))
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        from cryptography.fernet import Fernet

        setups = {"log off": {"TEXTOPS_PREDICTION_LOG": ""},
                  PLAIN: {"TEXTOPS_PREDICTION_LOG": f"sqlite:///{tmp}/predictions.db"},
                  ENCRYPTED: {"TEXTOPS_PREDICTION_LOG": f"sqlite:///{tmp}/encrypted.db",
                              "TEXTOPS_PREDICTION_LOG_KEYS": Fernet.generate_key().decode()}}
        if args.postgres:
            setups["log on, PostgreSQL"] = {"TEXTOPS_PREDICTION_LOG": args.postgres}
        services = {}
        for name, log_env in setups.items():
            env = {"TEXTOPS_MAX_QUEUE": "4096", "TEXTOPS_WATCH_INTERVAL_S": "0", **log_env}
            service = control.start(bundle, control.free_port(),
                                    logs / f"logging-{len(services)}.log", env=env)
            stack.callback(control.stop, service.process)
            control.wait_ready(service.url, 180, service.process)
            freeze(service.process)  # only the service being measured runs
            services[name] = service
        rounds: dict[str, list[float]] = {name: [] for name in setups}
        cpu: dict[str, list[float]] = {name: [] for name in setups}
        for round_ in range(args.rounds):
            # alternate which goes first, so neither always follows the other
            order = list(setups) if round_ % 2 == 0 else list(reversed(setups))
            for name in order:
                service = services[name]
                port = int(service.url.rsplit(":", 1)[1])
                thaw(service.process)
                before = cpu_seconds(service.process.pid)
                load = run_load(HOST, port, requests, args.concurrency, args.seconds,
                                warmup=0.5)
                settled(port)  # what the log writes after the load is this load's cost
                used = cpu_seconds(service.process.pid) - before
                freeze(service.process)
                summary = load.summary(1, CORES)
                # CPU of warm-up and measured time, over the texts of both
                texts = summary["texts_per_s"] * (args.seconds + 0.5)
                rounds[name].append(summary["texts_per_s"])
                cpu[name].append(used / texts * 1e6)
                print(f"round {round_ + 1:>2}  {name:<26} {summary['texts_per_s']:8.1f} texts/s "
                      f" server CPU {cpu[name][-1]:6.1f} us/text  p99 {summary['p99_ms']:6.1f} ms"
                      f"  errors {summary['errors']}", flush=True)
        for service in services.values():
            thaw(service.process)
        written = {name: counters(int(services[name].url.rsplit(":", 1)[1]))
                   for name in setups if setups[name]["TEXTOPS_PREDICTION_LOG"]}
    report(rounds, cpu, written, args)


def report(rounds: dict[str, list[float]], cpu: dict[str, list[float]], written: dict,
           args) -> None:
    off = rounds["log off"]
    ratios, cpu_ratios = {}, {}
    print(f"\nAt concurrency {args.concurrency}, median of {args.rounds} rounds:")
    for name, values in rounds.items():
        if name == "log off":
            continue
        per_round = [on / base for on, base in zip(values, off, strict=True)]
        ratio = statistics.median(per_round)
        ratios[name] = ratio
        cost = 1 - ratio
        verdict = "meets" if cost <= TARGET_COST else "MISSES"
        print(f"  {name:<26} {statistics.median(values):8.1f} texts/s vs "
              f"{statistics.median(off):8.1f} off: ratio {ratio:.3f}, cost {cost * 100:+.1f}% "
              f"({verdict} the target {TARGET_COST * 100:.0f}%); per round "
              f"{', '.join(f'{r:.3f}' for r in per_round)}")
        cpu_ratio = statistics.median(cpu[name]) / statistics.median(cpu["log off"])
        cpu_ratios[name] = cpu_ratio
        print(f"  {'':<26} server CPU per text {statistics.median(cpu[name]):.1f} us vs "
              f"{statistics.median(cpu['log off']):.1f} us off: {(cpu_ratio - 1) * 100:+.1f}%")
        print(f"  {'':<26} the log: {written[name]}")
    # Encryption's own cost: the encrypted log against the plain one, round by round.
    per_round = [e / p for e, p in zip(rounds[ENCRYPTED], rounds[PLAIN], strict=True)]
    encryption = statistics.median(per_round)
    verdict = "meets" if 1 - encryption <= TARGET_COST else "MISSES"
    print(f"  encryption: ratio encrypted/plain log {encryption:.3f}, cost "
          f"{(1 - encryption) * 100:+.1f}% ({verdict} the target {TARGET_COST * 100:.0f}%); "
          f"per round {', '.join(f'{r:.3f}' for r in per_round)}")
    payload = {"args": vars(args), "texts_per_s": rounds, "server_cpu_us_per_text": cpu,
               "ratio_on_off": ratios, "cpu_per_text_ratio_on_off": cpu_ratios,
               "ratio_encrypted_plain": encryption, "log_counters": written}
    print(f"\nwrote {publish(as_result(payload)).relative_to(ROOT)}")


ABOUT = f"""Services on the same bundle, one with the prediction log off, one logging
every answer and one logging every answer encrypted (Fernet, serving/predlog/crypto.py),
loaded in turns (off, on, on, off, ...) with SST-2 dev texts, one text per request. The
ratio is the median over rounds of each round's on/off throughput (and of encrypted/plain
log, for encryption's own cost); the target for each is a cost of at most
{TARGET_COST * 100:.0f}%. The server's own CPU time per text (its processes, the log's
included, until the log has written what the load gave it) moves less with the
machine's load, so it is given beside. Only the service under load runs; the others
are stopped meanwhile. Run again:
`python bench/bench_logging.py` (`make bench`)."""


def as_result(payload: dict) -> Result:
    rounds, cpu = payload["texts_per_s"], payload["server_cpu_us_per_text"]
    rows = [[name, round(statistics.median(values)), round(statistics.median(cpu[name]), 1),
             f"{payload['ratio_on_off'].get(name, 1.0):.3f}",
             f"{payload['cpu_per_text_ratio_on_off'].get(name, 1.0):.3f}"]
            for name, values in rounds.items()]
    table = Table(f"Median of {payload['args']['rounds']} rounds at concurrency "
                  f"{payload['args']['concurrency']}",
                  ["setting", "texts/s", "server CPU per text (us)", "throughput vs off",
                   "CPU per text vs off"], rows)
    summary = [[f"prediction log ({name}): throughput vs off", f"{ratio:.3f}"]
               for name, ratio in payload["ratio_on_off"].items()]
    summary.append(["prediction log encryption: throughput encrypted vs plain log",
                    f"{payload['ratio_encrypted_plain']:.3f}"])
    return Result("logging", "What the prediction log costs", ABOUT, [table], data=payload,
                  summary=summary)


if __name__ == "__main__":
    main()
