"""The CPU shadow scoring costs per text, against the challenger's own inference CPU
(bench/bench_shadow.py publishes both).

Measured without a champion or HTTP beside it, whose CPU per text varies by more
than the shadow's whole cost at a load the shadow keeps up with: a `Shadow` as a
server process runs it (serving/engine/shadow.py: its worker process, and a
prediction log on SQLite that stores the challenger's answers) is offered requests
of one text each at a steady rate. Its cost is the worker's CPU
(`textops_shadow_cpu_seconds`) plus this process's (offering, sending, receiving
and logging; less what pacing the same requests costs with no shadow to offer them
to, which a service spends on its requests anyway), per text scored. Each text is
offered as a service offers it: with the token ids the champion's tokenizer made of it
(computed beforehand: the champion's work, done on the request path anyway), which the
shadow sends in its place when the challenger's tokenizer.json is the champion's (the
challenger here is the champion's copy). Offered as from a champion with another
tokenizer (`own_tokenizer`), the texts go and the worker tokenizes them.

The challenger's own inference CPU is measured in a process of its own, loaded as
the worker loads it (one thread, warmed up), on the same texts in batches of
`max_batch_size` (64) in length groups, as a service's batcher runs them and its shadow
sends them, and at the same pace: a batch when RATE would have filled it, as the
shadow's worker gets them (a like-for-like baseline: the same batches at the same
times, the shadow's machinery the only difference). The same batches back to back, as
no process serving this rate runs them, are measured too (`own_back_to_back`) and
shown beside. Measured in this process instead, the same
inference came out 10-20% cheaper than in any spawned process, shadow worker or not:
the like-for-like baseline is a process like the worker's.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from serving.bundle import Bundle, RuntimeOptions
from serving.engine.following import load_warm
from serving.engine.inference import infer
from serving.engine.shadow import Shadow
from serving.monitoring.metrics import ServiceMetrics
from serving.predlog.writer import PredictionLog
from serving.settings import Settings

BATCH = Settings().max_batch_size  # the batcher's and the shadow's batches
CHAMPION = np.array([[0.2, 0.8]], dtype=np.float32)  # the champion's answer to a request
RATE = 1000  # texts per second offered: about what each of a loaded service's two
# server processes answers at concurrency 32 (docs/results/shadow.md), where shadow mode's
# fixed costs (its threads' wake-ups) weigh as they do in a busy service


def in_turn(names, rounds: int) -> list[tuple]:
    """Each round's order of `names`: each rotation of them, then of them reversed,
    in turn (every order of three), so that each goes first, and before and after each
    other, equally often: a drift of the machine's speed over the run weighs on each
    name alike."""
    names = list(names)
    orders = [tuple(ring[i:] + ring[:i]) for ring in (names, names[::-1])
              for i in range(len(names))]
    return [orders[r % len(orders)] for r in range(rounds)]


def own_inference(bundle_dir: Path, texts: list[str], passes: int, paced: bool,
                  results) -> None:
    """(In a process of its own) the CPU per text, in microseconds, of each pass of
    the challenger's inference over `texts`: a batch each time RATE fills one
    (`paced`), or back to back."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # as the worker runs: one thread
    settings = Settings().model_copy(update={"intra_op_threads": 1})
    bundle = load_warm(bundle_dir, settings)
    per_pass = []
    for _ in range(passes):
        started, due = time.process_time(), time.monotonic()
        for i in range(0, len(texts), BATCH):
            due += BATCH / RATE  # when the shadow's worker would have this batch
            if paced:
                time.sleep(max(0.0, due - time.monotonic()))
            infer(bundle, texts[i:i + BATCH])
        per_pass.append((time.process_time() - started) / len(texts) * 1e6)
    results.put(per_pass)


def own_cpu_per_text(bundle_dir: Path, texts: list[str], passes: int = 3,
                     paced: bool = True) -> float:
    """The challenger's own inference CPU per text (microseconds), median of passes."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=own_inference,
                              args=(bundle_dir, texts, passes, paced, results))
    process.start()
    per_pass = results.get(timeout=600)
    process.join()
    return statistics.median(per_pass)


def shadow_cpu_per_text(bundle_dir: Path, texts: list[str], where: Path,
                        same_tokenizer: bool = True) -> dict[str, float]:
    """Shadow scoring's CPU per text scored (microseconds): `worker`, `handover` (this
    process: offering, sending, receiving, logging) and `total`; the texts offered
    with the champion's token ids, from a champion with the challenger's tokenizer
    (`same_tokenizer`) or another."""
    challenger = Bundle.load(bundle_dir, "int8", RuntimeOptions(intra_op_threads=1))
    encoded = challenger.encode(texts)  # the champion's, on the request path
    champion = challenger if same_tokenizer else SimpleNamespace(inputs=None)
    pacing = offered(texts, encoded, champion, lambda *request, **named: None)
    metrics = ServiceMetrics(drift_window=10)
    log = PredictionLog(f"sqlite:///{where}/shadow-cpu.db", metrics)
    log.start()
    shadow = Shadow(challenger, Settings(), metrics, log, capacity=100_000, max_batch=BATCH)
    # read from the two counters alone: the registry's every collector costs this
    # process milliseconds a scrape
    scored = lambda: total(metrics.shadow, {"outcome": "scored"})  # noqa: E731
    worker_cpu = lambda: total(metrics.shadow_cpu)  # noqa: E731
    try:
        shadow.offer("warm-up", texts[:1], CHAMPION)
        wait_for(lambda: scored() == 1, shadow)
        log.flush()
        worker_before, started = worker_cpu(), time.process_time()
        offered(texts, encoded, champion, shadow.offer)
        wait_for(lambda: scored() == 1 + len(texts), shadow)
        log.flush()
        handover = (time.process_time() - started - pacing) / len(texts) * 1e6
        worker = (worker_cpu() - worker_before) / len(texts) * 1e6
    finally:
        shadow.close()
        log.close()
    return {"worker": worker, "handover": handover, "total": worker + handover}


def offered(texts: list[str], encoded: list, champion, offer) -> float:
    """Offer each text as a request of its own at a steady RATE, with the ids
    `champion` made of it; this process's CPU seconds for it. Pacing alone (`offer`
    doing nothing) costs this process CPU too (waking up a hundred times a second),
    which the shadow is not charged with."""
    started, tick = time.process_time(), time.monotonic()
    for i, text in enumerate(texts):
        offer(f"r{i}", [text], CHAMPION, encoded=encoded[i:i + 1], by=champion)
        if i % 10 == 9:  # ten at a time
            tick += 10 / RATE
            time.sleep(max(0.0, tick - time.monotonic()))
    return time.process_time() - started


def total(counter, labels: dict | None = None) -> float:
    return sum(sample.value for family in counter.collect() for sample in family.samples
               if sample.name.endswith("_total") and sample.labels == (labels or {}))


def wait_for(done, shadow: Shadow, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if shadow.dead or time.monotonic() > deadline:
            raise RuntimeError(f"the shadow did not score what it was offered: {shadow.dead}")
        time.sleep(0.05)


def measure(bundle_dir: Path, texts: list[str], where: Path, rounds: int = 8) -> dict:
    """Shadow scoring's CPU per text (the champion's ids scored, and, `own_tokenizer`,
    the texts tokenized again) and the challenger's own (paced, and back to back), in
    rounds of all four, in turn as `in_turn` orders them (eight rounds: each first
    twice); each figure the median of its rounds, and a ratio the median of the
    rounds' ratios, a shadow measured beside its own baseline (their spread is on the
    page: this machine's speed drifts by more than the shadow's cost)."""
    own, flat, shadow, texts_shadow = [], [], [], []
    steps = {"own": lambda: own.append(own_cpu_per_text(bundle_dir, texts)),
             "shadow": lambda: shadow.append(shadow_cpu_per_text(bundle_dir, texts, where)),
             "own_tokenizer": lambda: texts_shadow.append(
                 shadow_cpu_per_text(bundle_dir, texts, where, same_tokenizer=False)),
             "flat": lambda: flat.append(own_cpu_per_text(bundle_dir, texts, paced=False))}
    for round_, order in enumerate(in_turn(steps, rounds)):
        for step in order:
            steps[step]()
        print(f"shadow CPU, round {round_ + 1}: own {own[-1]:.1f} us/text (back to back "
              f"{flat[-1]:.1f}), shadow {shadow[-1]['total']:.1f} (worker "
              f"{shadow[-1]['worker']:.1f}, handing over and logging "
              f"{shadow[-1]['handover']:.1f}), tokenizing again "
              f"{texts_shadow[-1]['total']:.1f}", flush=True)

    def ratio(shadows: list[dict], baseline: list[float]) -> float:
        return statistics.median(r["total"] / o for r, o in zip(shadows, baseline, strict=True))

    return {"own": statistics.median(own), "own_back_to_back": statistics.median(flat),
            "ratio": ratio(shadow, own), "ratio_back_to_back": ratio(shadow, flat),
            "ratio_own_tokenizer": ratio(texts_shadow, own),
            **{part: statistics.median(r[part] for r in shadow) for part in shadow[0]},
            "own_tokenizer": {part: statistics.median(r[part] for r in texts_shadow)
                              for part in texts_shadow[0]},
            "rounds": {"own": own, "own_back_to_back": flat, "shadow": shadow,
                       "own_tokenizer": texts_shadow}}
