"""What shadow mode costs: the request path's p99 with a challenger in shadow against
none, and the CPU shadow scoring spends per text against the challenger's own
inference CPU.

    python bench/bench_shadow.py [--bundle models/current] [--seconds 3] [--rounds 12]
                                 [--shadow-cpu 0.1]

Two services on the same bundle, both logging their predictions: one alone, one with
a challenger in shadow (the same model under another version, so a challenger of the
champion's size), loaded in turns at concurrency 32 with SST-2 dev texts, one text
per request: the p99 latency of each (target: within 10% of shadow off). The shadow
then scores what the spare CPU allows and drops the rest (counted). A third service
runs the shadow within a CPU budget (--shadow-cpu cores per worker, TEXTOPS_SHADOW_CPU).

Shadow scoring's CPU per text, and the challenger's own inference CPU, are measured
apart from the services (bench/shadow_cpu.py says how and why): a shadow as a server
process runs it, offered the dev texts at a steady rate, against the challenger's
inference in a process of its own on the same texts (target: at most 1.1x): offered
as a service offers them, with the champion's token ids, which the shadow scores when
the challenger's tokenizer.json is the champion's, as here; and as from a champion
with another tokenizer, when the challenger tokenizes the texts again.
Publishes bench/results/shadow.json and docs/results/shadow.md.
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

import shadow_cpu  # noqa: E402
from bench_logging import cpu_seconds  # noqa: E402
from bench_serving import CORES, HOST  # noqa: E402
from loadgen import build_requests, run_load  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from results import Result, Table, publish  # noqa: E402
from workload import bodies_for, dev_texts  # noqa: E402

from ops import control  # noqa: E402

P99_TARGET, CPU_TARGET = 1.10, 1.10
OFF, ON = "shadow off", "shadow on"


def counters(url: str) -> dict[str, float]:
    """The service's counts this benchmark reads: texts answered (`answered`), the
    shadow's texts by outcome, and its worker's CPU seconds (`shadow_cpu`)."""
    import httpx

    counts = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == "textops_shadow_texts_total":
                counts[sample.labels["outcome"]] = sample.value
            elif sample.name == "textops_shadow_cpu_seconds_total":
                counts["shadow_cpu"] = sample.value
            elif sample.name == "textops_batch_texts_sum":
                counts["answered"] = sample.value
    return counts


def measured(service, requests: list[bytes], args) -> dict:
    """One load of `service`: the load's summary, with the server's CPU seconds
    (`cpu`) and the changes in its counters (`counters`) over the load."""
    port = int(service.url.rsplit(":", 1)[1])
    before_cpu, before = cpu_seconds(service.process.pid), counters(service.url)
    load = run_load(HOST, port, requests, args.concurrency, args.seconds, warmup=0.5)
    used, after = cpu_seconds(service.process.pid) - before_cpu, counters(service.url)
    return {**load.summary(1, CORES), "cpu": used,
            "counters": {key: after[key] - before.get(key, 0) for key in after}}


def challenger_copy(bundle: Path, where: Path) -> Path:
    copy = Path(shutil.copytree(bundle, where / "challenger"))
    meta = json.loads((copy / "bundle.json").read_text())
    (copy / "bundle.json").write_text(json.dumps({**meta, "version": "shadow-bench"}))
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default="models/current")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=12,
                        help="loads of each service, in each order of the three in turn")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--shadow-cpu", type=float, default=0.1,
                        help="the third service's TEXTOPS_SHADOW_CPU, cores per worker")
    args = parser.parse_args()
    capped = capped_name(args.shadow_cpu)
    bundle = (ROOT / args.bundle).resolve()
    logs = ROOT / "bench" / "results"
    texts = dev_texts()
    requests = build_requests(HOST, "/predict", bodies_for("service", texts, 1))
    loads = {OFF: [], ON: [], capped: []}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        challenger = challenger_copy(bundle, Path(tmp))
        services = {}
        shadow = {"TEXTOPS_CHALLENGER": str(challenger)}
        for name, extra in ((OFF, {}), (ON, shadow),
                            (capped, {**shadow, "TEXTOPS_SHADOW_CPU": str(args.shadow_cpu)})):
            env = {"TEXTOPS_MAX_QUEUE": "4096", "TEXTOPS_WATCH_INTERVAL_S": "0",
                   "TEXTOPS_PREDICTION_LOG": f"sqlite:///{tmp}/{len(services)}.db", **extra}
            service = control.start(bundle, control.free_port(),
                                    logs / f"shadow-{len(services)}.log", env=env)
            stack.callback(control.stop, service.process)
            control.wait_ready(service.url, 180, service.process)
            services[name] = service
        for round_, order in enumerate(shadow_cpu.in_turn(services, args.rounds)):
            for name in order:
                loads[name].append(measured(services[name], requests, args))
                print(f"round {round_ + 1:>2}  {name:<24} " + line(loads[name][-1]),
                      flush=True)
                if name != OFF:  # its backlog scored before another is loaded
                    drained(services[name].url)
        stack.close()  # the services stopped: the CPU figures want a quiet machine
        cpu = shadow_cpu.measure(challenger, texts * 4, Path(tmp))
    median = statistics.median
    def p99_ratio(name: str) -> float:
        return (median(r["p99_ms"] for r in loads[name])
                / median(r["p99_ms"] for r in loads[OFF]))

    payload = {"args": vars(args), "loads": loads, "cpu": cpu,
               "p99_ratio": p99_ratio(ON), "scored_share": share_scored(loads[ON]),
               "capped_p99_ratio": p99_ratio(capped),
               "capped_scored_share": share_scored(loads[capped]),
               "cpu_ratio": cpu["ratio"]}
    print(f"p99 on/off {payload['p99_ratio']:.3f}, within {args.shadow_cpu} cores "
          f"{payload['capped_p99_ratio']:.3f} (target <= {P99_TARGET}); the shadow "
          f"scored {payload['scored_share']:.1%} of the texts, within its budget "
          f"{payload['capped_scored_share']:.1%}; its CPU {cpu['total']:.1f} us "
          f"per text against the challenger's own {cpu['own']:.1f}: "
          f"{payload['cpu_ratio']:.2f}x (target <= {CPU_TARGET}); tokenizing the texts "
          f"again, {cpu['own_tokenizer']['total']:.1f} us: "
          f"{cpu['ratio_own_tokenizer']:.2f}x")
    print(f"wrote {publish(as_result(payload)).relative_to(ROOT)}")


def capped_name(cores: float) -> str:
    return f"shadow on, within {cores:g} cores"


def drained(url: str, timeout: float = 120) -> None:
    """Wait until the shadow has dealt with every text it was offered (scored, failed
    or dropped: every text answered is offered), so that no worker, within a CPU budget
    or not, still scores while another service is loaded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = counters(url)
        done = sum(counts.get(outcome, 0) for outcome in ("scored", "failed", "dropped"))
        if done >= counts.get("answered", 0):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{url}: the shadow has not dealt with what it was offered in "
                       f"{timeout:.0f} s")


def line(load: dict) -> str:
    counts = load["counters"]
    shadow = f"  shadow scored {counts['scored']:.0f}" if "scored" in counts else ""
    return (f"{load['texts_per_s']:8.1f} texts/s  p99 {load['p99_ms']:6.1f} ms  server "
            f"CPU {per_text(load):6.1f} us/text  errors {load['errors']}{shadow}")


def per_text(load: dict) -> float:
    """The server's CPU per text answered, in microseconds."""
    return load["cpu"] / load["counters"]["answered"] * 1e6


def share_scored(loads: list[dict]) -> float:
    scored = sum(load["counters"]["scored"] for load in loads)
    return scored / (scored + sum(load["counters"]["dropped"] for load in loads))


ABOUT = f"""Three services on the same bundle, all logging predictions, two with a
challenger in shadow (the same model under another version), one of them within a
CPU budget (TEXTOPS_SHADOW_CPU={{cores}} cores per worker), loaded in turns at
concurrency {{concurrency}} with SST-2 dev texts, one text per request; a shadow
scores what waited before the next load. A p99 ratio is the median p99 of a service
with a shadow over the one without (target at most {P99_TARGET}). The shadow runs at
the lowest CPU priority, so on a saturated server it scores what the spare CPU allows
and drops the rest (counted); the budget bounds that CPU further (it yields a core, not
the core's caches or its hardware-thread sibling). Shadow scoring's CPU per text is
measured apart from the
services, whose CPU per text varies by more than the shadow's whole cost: a shadow as
a server process runs it, with its worker process and a prediction log on SQLite, is
offered the dev texts (four times over) at {shadow_cpu.RATE} texts/s, each with the
token ids the champion's tokenizer made of it (on the request path, not charged), which
the shadow scores as they are since the challenger's tokenizer.json is the champion's;
and again as from a champion with another tokenizer, the texts tokenized by the worker
(`tokenizing again`). Its cost is the worker's CPU
(`textops_shadow_cpu_seconds`) and the offering process's (handing texts over,
receiving and logging the answers), per text scored, against the challenger's own
inference CPU per text on the same texts in a process of its own, loaded as the
worker loads it, in batches of {shadow_cpu.BATCH} in length groups on one thread (as the
champion's batcher runs them and the shadow's are sent), a batch each time
{shadow_cpu.RATE} texts/s fill one, as the worker gets them: the same batches at the
same times, the shadow's machinery the only difference (and, shown beside, the same
batches back to back, as no process serving this rate runs them); medians of {{rounds}}
rounds of all four, each first and each before and after each other in turn, and the
ratio (target at most
{CPU_TARGET}x) the median of the rounds' ratios, a shadow beside its own baseline: this
machine's speed drifts between rounds by more than the shadow's cost. Run again:
`python bench/bench_shadow.py --bundle models/current`."""


def as_result(payload: dict) -> Result:
    median = statistics.median
    loads, cpu = payload["loads"], payload["cpu"]
    capped, cores = capped_name(payload["args"]["shadow_cpu"]), payload["args"]["shadow_cpu"]
    rows = [[name, round(median(r["texts_per_s"] for r in loads[name]), 1),
             round(median(r["p99_ms"] for r in loads[name]), 1),
             round(median(per_text(r) for r in loads[name]), 1)]
            for name in (OFF, ON, capped)]
    table = Table(f"Median of {payload['args']['rounds']} rounds at concurrency "
                  f"{payload['args']['concurrency']}",
                  ["setting", "texts/s", "p99 (ms)", "server CPU per text (us)"], rows)
    cost = Table("Shadow mode's cost", ["measure", "value", "target"], [
        ["p99, shadow on / off", f"{payload['p99_ratio']:.3f}", f"<= {P99_TARGET}"],
        [f"texts the shadow scored at concurrency {payload['args']['concurrency']} (the "
         "rest dropped, counted)",
         f"{payload['scored_share']:.1%}", ""],
        [f"p99, shadow within {cores:g} cores per worker / off",
         f"{payload['capped_p99_ratio']:.3f}", f"<= {P99_TARGET}"],
        [f"texts the shadow scored within {cores:g} cores per worker",
         f"{payload['capped_scored_share']:.1%}", ""],
        ["shadow CPU per scored text (us)", round(cpu["total"], 1), ""],
        ["of which the shadow worker's (us)", round(cpu["worker"], 1), ""],
        ["of which handing over, receiving and logging (us)", round(cpu["handover"], 1), ""],
        ["the challenger's own inference CPU per text, at the shadow's pace (us)",
         round(cpu["own"], 1), ""],
        ["shadow CPU / the challenger's own (median of the rounds')",
         f"{payload['cpu_ratio']:.2f}", f"<= {CPU_TARGET}"],
        ["shadow CPU per scored text, tokenizing again (us)",
         round(cpu["own_tokenizer"]["total"], 1), ""],
        ["shadow CPU tokenizing again / the challenger's own (median of the rounds')",
         f"{cpu['ratio_own_tokenizer']:.2f}", ""],
        ["the challenger's own, its batches back to back (us)",
         round(cpu["own_back_to_back"], 1), ""],
        ["shadow CPU / the challenger's own back to back (median of the rounds')",
         f"{cpu['ratio_back_to_back']:.2f}", ""]])
    measured = cpu["rounds"]
    per_round = Table("CPU per text in each round (us)",
                      ["round", "challenger's own", "back to back", "shadow", "ratio",
                       "shadow tokenizing again", "ratio"],
                      [[i + 1, round(own, 1), round(flat, 1), round(shadow["total"], 1),
                        f"{shadow['total'] / own:.2f}", round(again["total"], 1),
                        f"{again['total'] / own:.2f}"]
                       for i, (own, flat, shadow, again) in enumerate(zip(
                           measured["own"], measured["own_back_to_back"], measured["shadow"],
                           measured["own_tokenizer"], strict=True))])
    concurrency = payload["args"]["concurrency"]
    summary = [[f"shadow mode: p99 on / off at concurrency {concurrency}",
                f"{payload['p99_ratio']:.3f}"],
               [f"shadow mode within {cores:g} cores per worker (TEXTOPS_SHADOW_CPU): p99 "
                f"on / off at concurrency {concurrency}",
                f"{payload['capped_p99_ratio']:.3f}"],
               ["shadow mode: CPU / the challenger's own inference (the champion's "
                "tokenizer)", f"{payload['cpu_ratio']:.2f}x"],
               ["shadow mode: CPU / the challenger's own inference (a tokenizer of its "
                "own)", f"{cpu['ratio_own_tokenizer']:.2f}x"]]
    about = ABOUT.replace("{rounds}", str(len(cpu["rounds"]["own"]))).replace(
        "{concurrency}", str(concurrency)).replace("{cores}", f"{cores:g}")
    return Result("shadow", "What shadow mode costs", about, [table, cost, per_round],
                  data=payload, summary=summary)


if __name__ == "__main__":
    main()
