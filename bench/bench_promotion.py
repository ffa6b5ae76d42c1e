"""Promotion on evidence: the sequential rule of pipeline/promotion/sequential.py in
simulation (issue 29).

    python bench/bench_promotion.py                    # seeded; under a minute on one core
    python bench/bench_promotion.py --experiments 300 --no-publish

Labelled requests are simulated one at a time and the rule (conf/promotion/default.yaml)
decides after every label, up to the horizon; each experiment ends at its first
decision. The champion is 0.867 accurate (the default model's SST-2 test accuracy).
Shadow: the two models answer the same requests; a request is discordant (exactly one
model right) with probability d, the challenger the right one with probability
(d + delta)/2, so both models are right on 0.867 - (d - delta)/2 of them (the errors of
two real classifiers are correlated: independent ones would disagree on 23%). Canary:
each labelled request was served by the challenger with probability `canary.share`,
whose answer is right with its own accuracy. Reported: the false promotion and rollback
rates with no true difference, against alpha; with a challenger 3 points better (or
worse), how often and after how many labels it is promoted (rolled back); and the
fixed-horizon test with the same power.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from scipy.optimize import brentq
from scipy.stats import binom, binomtest, norm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from results import Plot, Result, Table, publish  # noqa: E402

from pipeline.promotion.sequential import (  # noqa: E402
    OUTCOMES,
    PROMOTE,
    ROLLBACK,
    STOP,
    Rule,
    canary_outcomes,
    paired_outcomes,
)

CHAMPION = 0.867  # the default model's SST-2 test accuracy (docs/results/accuracy.md)
GAIN = 0.03
DISCORDANCE = 0.10  # the main setting; 0.08 and 0.12 too for the challenger 3 points better
CHUNK, BLOCK = 100, 500  # experiments generated at once, labels evaluated at once
POWERS = (0.8, 0.9, 0.95)


def shadow_chunk(rng, e: int, h: int, d: float, delta: float):
    """Cumulative (n, b, c) after each label of e experiments."""
    u = rng.random((e, h), dtype=np.float32)
    pb, pc = (d + delta) / 2, (d - delta) / 2
    b = np.cumsum(u < pb, axis=1, dtype=np.int32)
    c = np.cumsum((u >= pb) & (u < pb + pc), axis=1, dtype=np.int32)
    return np.broadcast_to(np.arange(1, h + 1, dtype=np.int32), (e, h)), b, c


def canary_chunk(rng, e: int, h: int, share: float, delta: float):
    """Cumulative (champion n, right, challenger n, right) after each label."""
    to_challenger = rng.random((e, h), dtype=np.float32) < share
    right = rng.random((e, h), dtype=np.float32) < np.where(to_challenger, CHAMPION + delta,
                                                            CHAMPION)
    nB = np.cumsum(to_challenger, axis=1, dtype=np.int32)
    xB = np.cumsum(right & to_challenger, axis=1, dtype=np.int32)
    xA = np.cumsum(right & ~to_challenger, axis=1, dtype=np.int32)
    return np.arange(1, h + 1, dtype=np.int32) - nB, xA, nB, xB


def simulate(mode: str, rule: Rule, experiments: int, seed: int, setting: float,
             delta: float) -> tuple[np.ndarray, np.ndarray]:
    """(outcome index, labels at the decision) of each experiment, each decided at the
    first label after which the rule says anything but continue."""
    rng = np.random.default_rng(seed)
    h = rule.max_labels
    outcome, labels = np.zeros(experiments, np.int8), np.full(experiments, h, np.int64)
    for first in range(0, experiments, CHUNK):
        e = min(CHUNK, experiments - first)
        if mode == "shadow":
            paths, decide = shadow_chunk(rng, e, h, setting, delta), paired_outcomes
        else:
            paths, decide = canary_chunk(rng, e, h, setting, delta), canary_outcomes
        running = np.arange(e)
        for start in range(0, h, BLOCK):
            codes = decide(*(p[running, start:start + BLOCK] for p in paths), rule)
            done = (codes != 0).any(axis=1)
            at = (codes != 0).argmax(axis=1)[done]
            outcome[first + running[done]] = codes[done, at]
            labels[first + running[done]] = start + at + 1
            running = running[~done]
            if not running.size:
                break
    return outcome, labels


def rate(k: int, n: int) -> list:
    low, high = binomtest(k, n).proportion_ci(0.95)
    return [round(k / n, 4), f"{low:.4f} to {high:.4f}"]


def mcnemar_power(n: int, d: float, delta: float, alpha: float) -> float:
    """Exact power of the two-sided exact McNemar test at n pairs, in the challenger's
    favour: b of the m discordant pairs at least the binomial(m, 1/2) critical value."""
    m = np.arange(n + 1)
    critical = binom.ppf(1 - alpha / 2, m, 0.5) + 1  # the least b with P(B >= b) <= alpha/2
    return float(binom.pmf(m, n, d) @ binom.sf(critical - 1, m, (d + delta) / (2 * d)))


def mcnemar_n(power: float, d: float, delta: float, alpha: float) -> tuple[int, int]:
    """(the least n whose exact power reaches `power`, the normal approximation's n)."""
    za, zb = norm.ppf(1 - alpha / 2), norm.ppf(power)
    approx = int(np.ceil((za * np.sqrt(d) + zb * np.sqrt(d - delta ** 2)) ** 2 / delta ** 2))
    n = int(approx * 0.8)
    while mcnemar_power(n, d, delta, alpha) < power:
        n += 1
    return n, approx


def two_proportion_n(power: float, share: float, delta: float, alpha: float) -> int:
    """Labels (both arms) the pooled two-proportion z-test needs, normal approximation."""
    pa, pb = CHAMPION, CHAMPION + delta
    pooled = (1 - share) * pa + share * pb

    def gap(n: float) -> float:
        na, nb = (1 - share) * n, share * n
        se0 = np.sqrt(pooled * (1 - pooled) * (1 / na + 1 / nb))
        se1 = np.sqrt(pa * (1 - pa) / na + pb * (1 - pb) / nb)
        return norm.cdf((delta - norm.ppf(1 - alpha / 2) * se0) / se1) - power

    return int(np.ceil(brentq(gap, 10, 1e7)))


def quantile_labels(outcome: np.ndarray, labels: np.ndarray, wanted: str, q: float):
    """The least number of labels by which a share q of the experiments reached `wanted`
    (None: never within the horizon)."""
    hit = np.sort(labels[outcome == OUTCOMES.index(wanted)])
    k = int(np.ceil(q * outcome.size))
    return int(hit[k - 1]) if k <= hit.size else None


def run(experiments: int, seed: int) -> Result:
    config = yaml.safe_load((ROOT / "conf/promotion/default.yaml").read_text())
    rules = {mode: Rule.from_config(config, mode) for mode in ("shadow", "canary")}
    share, alpha = config["canary"]["share"], config["alpha"]
    seeds = iter(np.random.SeedSequence(seed).generate_state(16))
    scenarios = [("no difference", "shadow", DISCORDANCE, 0.0),
                 ("no difference", "canary", share, 0.0),
                 *[("3 points better", "shadow", d, GAIN) for d in (0.08, DISCORDANCE, 0.12)],
                 ("3 points better", "canary", share, GAIN),
                 ("3 points worse", "shadow", DISCORDANCE, -GAIN),
                 ("3 points worse", "canary", share, -GAIN)]
    runs = []
    for name, mode, setting, delta in scenarios:
        started, h = time.perf_counter(), rules[mode].max_labels
        outcome, labels = simulate(mode, rules[mode], experiments, int(next(seeds)), setting,
                                   delta)
        count = {o: int((outcome == i).sum()) for i, o in enumerate(OUTCOMES)}
        wanted = PROMOTE if delta > 0 else ROLLBACK
        hit = labels[outcome == OUTCOMES.index(wanted)]
        runs.append({"scenario": name, "mode": mode, "setting": setting, "delta": delta,
                     "experiments": experiments, "horizon": rules[mode].max_labels,
                     "outcomes": count, "median_labels_to_stop": float(np.median(labels)),
                     f"{wanted}_labels": {"median": float(np.median(hit)) if hit.size else None,
                                          "p90": float(np.percentile(hit, 90)) if hit.size
                                          else None},
                     "quantiles": {str(q): quantile_labels(outcome, labels, wanted, q)
                                   for q in POWERS} if delta else {},
                     "reached_by": {str(n): round(float((hit <= n).sum() / experiments), 4)
                                    for n in np.linspace(0, h, 21)[1:].astype(int)},
                     "seconds": round(time.perf_counter() - started, 1)})
        print(f"promotion: {name}, {mode} {setting}: {count} ({runs[-1]['seconds']} s)",
              flush=True)
    return as_result(runs, rules, share, alpha, experiments, seed)


def setting_text(mode: str, setting: float) -> str:
    return f"discordance {setting:g}" if mode == "shadow" else f"share {setting:g}"


def as_result(runs, rules, share, alpha, experiments, seed) -> Result:
    null = [[r["mode"], setting_text(r["mode"], r["setting"]), r["experiments"], r["horizon"],
             *rate(r["outcomes"][PROMOTE], r["experiments"]),
             *rate(r["outcomes"][ROLLBACK], r["experiments"]), alpha,
             r["median_labels_to_stop"]] for r in runs if r["delta"] == 0]
    effect = []
    for r in (r for r in runs if r["delta"]):
        wanted, wrong = (PROMOTE, ROLLBACK) if r["delta"] > 0 else (ROLLBACK, PROMOTE)
        effect.append([r["scenario"], r["mode"], setting_text(r["mode"], r["setting"]),
                       r["experiments"], f"{wanted} {r['outcomes'][wanted] / r['experiments']:.3f}",
                       r[f"{wanted}_labels"]["median"], r[f"{wanted}_labels"]["p90"],
                       r["outcomes"][wrong], r["outcomes"][STOP]])
    compare, curve = [], {}
    for r in runs:
        if r["scenario"] != "3 points better" or r["setting"] not in (DISCORDANCE, share):
            continue
        for q in POWERS:
            if r["mode"] == "shadow":
                fixed, approx = mcnemar_n(q, r["setting"], GAIN, alpha)
                test = f"exact McNemar, exact power (normal approximation: {approx:,})"
            else:
                fixed, test = two_proportion_n(q, share, GAIN, alpha), \
                    "pooled two-proportion z-test, normal approximation"
            sequential = r["quantiles"][str(q)]
            compare.append([r["mode"], q, test, fixed, sequential,
                            r["promote_labels"]["median"],
                            round(r["promote_labels"]["median"] / fixed, 2)])
        if r["mode"] == "shadow":
            curve = {"sequential: promoted by n labels": [[int(n), share_by] for n, share_by
                                                          in r["reached_by"].items()],
                     "exact McNemar at a fixed horizon of n": [
                         [int(n), round(mcnemar_power(int(n), r["setting"], GAIN, alpha), 4)]
                         for n in r["reached_by"]]}
    tables = [
        Table(f"No true difference (both models {CHAMPION} accurate), the rule checked after "
              "every label up to the horizon: wrong decisions", [
                  "mode", "setting", "experiments", "horizon (labels)", "false promotions",
                  "95% CI", "false rollbacks", "95% CI", "alpha", "median labels to a stop"],
              null),
        Table(f"The challenger {GAIN:g} better or worse than the champion ({CHAMPION})", [
            "challenger", "mode", "setting", "experiments", "right decision",
            "median labels to it", "90th percentile", "wrong decisions",
            "stopped with no difference"], effect),
        Table("Labels for the same power (challenger 3 points better): a fixed-horizon test "
              "against the sequential rule", [
                  "mode", "power", "fixed-horizon test", "its labels",
                  "sequential: labels by which this share is promoted",
                  "sequential: median labels to promotion", "median / fixed"], compare),
    ]
    plots = [Plot(f"Shadow, challenger +{GAIN:g}, discordance {DISCORDANCE:g}: share promoted",
                  "line", "labels", "share promoted (power)", curve)] if curve else []
    shadow = next(r for r in runs if r["mode"] == "shadow" and r["delta"] == 0)
    better = next(r for r in runs if r["mode"] == "shadow" and r["delta"] > 0
                  and r["setting"] == DISCORDANCE)
    fixed90 = next(row[3] for row in compare if row[0] == "shadow" and row[1] == 0.9)
    summary = [
        ["promotion: false promotions with no difference, checked after every label "
         f"(shadow, alpha {alpha:g})", f"{shadow['outcomes'][PROMOTE] / experiments:.3f}"],
        ["promotion: labels to promote a challenger 3 points better (shadow, median)",
         int(better["promote_labels"]["median"])],
        ["promotion: labels of the exact McNemar test at a fixed horizon, same 90% power",
         fixed90],
    ]
    return Result("promotion", "Promotion on evidence: the sequential test in simulation",
                  ABOUT.format(experiments=experiments, seed=seed), tables, plots,
                  data={"runs": runs, "rules": {m: vars(r) for m, r in rules.items()},
                        "seed": seed}, summary=summary)


ABOUT = """The promotion rule of `pipeline/promotion/sequential.py` with the settings of
`conf/promotion/default.yaml` ([the feedback loop](../loop.md#on-evidence-from-production)),
on simulated labelled traffic: {experiments:,} seeded experiments per row (seed {seed}),
the rule checked after every label, each experiment ending at its first decision or
at the horizon. The champion is 0.867 accurate (SST-2). Shadow: both models answer
every request; "discordance" is the share of requests exactly one of them gets right
(independent errors would give 0.23; real classifiers share their hard cases), the
challenger's share of those wins being (discordance + gain)/2. Canary: "share" of the
labelled requests were served by the challenger. With no true difference, a promotion
or a rollback is a wrong decision: their rates against alpha, with exact (Clopper-Pearson)
95% intervals. The fixed-horizon tests are computed, not simulated: McNemar's exact
test exactly (summing over the number of discordant pairs), the two-proportion z-test by
its normal approximation; "labels by which this share is promoted" is the horizon at
which the sequential rule has that power. Run again: `python bench/bench_promotion.py`."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiments", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=29)
    parser.add_argument("--no-publish", action="store_true")
    args = parser.parse_args()
    result = run(args.experiments, args.seed)
    if args.no_publish:
        from results import page, stamp

        result.stamp = stamp()
        print(page(result))
    else:
        print(publish(result).read_text())


if __name__ == "__main__":
    main()
