"""The promotion rule (pipeline/promotion/sequential.py): its e-values against a direct
computation, its error rates under continuous monitoring in seeded simulations, and
its decisions as a pure function of the counts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from conftest import ROOT
from scipy.integrate import quad
from scipy.stats import norm

from pipeline.promotion.sequential import (
    OUTCOMES,
    Paired,
    Rule,
    SequentialTest,
    Unpaired,
    bets,
    canary_outcomes,
    canary_stats,
    decide,
    log_capital,
    paired_outcomes,
)

RULE = Rule()  # alpha 0.05, min_effect 0.005, min_labels 100, horizon 5000
CANARY = Rule(max_labels=20000)


def capital(xs: list[int], delta0: float, side: int, rule: Rule = RULE) -> float:
    """E+ (side 1) or E- at delta0, straight from its definition: the mean over the bets
    of prod (1 + l (x - delta0)), label by label."""
    total = 0.0
    for lam in side * bets(rule):
        k = 1.0
        for x in xs:
            k *= 1 + lam * (x - delta0)
        total += k
    return total / len(bets(rule))


def first_outcomes(codes: np.ndarray) -> np.ndarray:
    """Each experiment's first decision (0: none) over its labels, checked after each."""
    done = codes != 0
    return np.where(done.any(axis=1), codes[np.arange(len(codes)), done.argmax(axis=1)], 0)


def shadow_paths(seed: int, experiments: int, horizon: int, d: float, delta: float):
    u = np.random.default_rng(seed).random((experiments, horizon))
    pb, pc = (d + delta) / 2, (d - delta) / 2
    b = np.cumsum(u < pb, axis=1)
    c = np.cumsum((u >= pb) & (u < pb + pc), axis=1)
    return np.arange(1, horizon + 1), b, c


def canary_paths(seed: int, experiments: int, horizon: int, share: float, delta: float):
    rng = np.random.default_rng(seed)
    z = rng.random((experiments, horizon)) < share
    right = rng.random((experiments, horizon)) < np.where(z, 0.867 + delta, 0.867)
    nB = np.cumsum(z, axis=1)
    return (np.arange(1, horizon + 1) - nB, np.cumsum(right & ~z, axis=1), nB,
            np.cumsum(right & z, axis=1))


# ---------------------------------------------------------------- the evidence


@pytest.mark.parametrize("xs", [[1], [1, 0, -1, 1, 1, 0, 0, 1], [-1, -1, 0, 1, -1, 0]])
@pytest.mark.parametrize("delta0", [0.0, 0.02, -0.1])
def test_the_shadow_e_value_is_the_betting_capital(xs, delta0):
    n, b, c = len(xs), xs.count(1), xs.count(-1)
    for side in (1, -1):
        got = math.exp(float(log_capital(n, b, c, delta0, side, RULE)))
        assert got == pytest.approx(capital(xs, delta0, side), rel=1e-9)
    decision = decide(Paired(n, b, c))
    assert decision.e_value == pytest.approx(max(capital(xs, 0, 1), capital(xs, 0, -1)) / 2)
    assert decision.p_value == pytest.approx(min(1, 1 / decision.e_value))


def test_at_no_difference_the_shadow_e_value_mixes_mcnemar_likelihood_ratios():
    b, c = 7, 2  # concordant pairs change nothing
    ratios = [(q ** b * (1 - q) ** c) / 0.5 ** (b + c) for q in (1 + bets(RULE)) / 2]
    for n in (9, 50, 500):
        assert math.exp(float(log_capital(n, b, c, 0.0, 1, RULE))) == \
            pytest.approx(np.mean(ratios), rel=1e-9)


def test_the_canary_e_value_is_the_normal_mixture_likelihood_ratio():
    nA, xA, nB, xB = 900, 780, 100, 93
    est, log_lr, lower, upper = map(float, canary_stats(nA, xA, nB, xB, RULE))
    pooled = (xA + xB) / (nA + nB)
    v = pooled * (1 - pooled) * (1 / nA + 1 / nB)
    mixture, _ = quad(lambda t: norm.pdf(est, t, math.sqrt(v)) * norm.pdf(t, 0, RULE.tau),
                      -1, 1, points=[0, est])
    assert math.exp(log_lr) == pytest.approx(mixture / norm.pdf(est, 0, math.sqrt(v)), rel=1e-6)
    assert lower < est < upper


def test_the_confidence_sequence_is_where_the_test_does_not_reject():
    counts, threshold = Paired(3000, 230, 140), math.log(2 / RULE.alpha)
    d = decide(counts)
    assert d.lower < d.effect < d.upper
    for bound, side in ((d.lower, 1), (d.upper, -1)):
        inner, outer = bound + side * 1e-6, bound - side * 1e-6
        assert log_capital(3000, 230, 140, inner, side, RULE) < threshold
        assert log_capital(3000, 230, 140, outer, side, RULE) >= threshold


# ---------------------------------------------------------------- in simulation


def test_checked_after_every_label_no_difference_rarely_promotes():
    """300 experiments x 2000 labels, both models 0.867, decided after every label."""
    n, b, c = shadow_paths(1, 300, 2000, d=0.10, delta=0.0)
    first = first_outcomes(paired_outcomes(n, b, c, Rule(max_labels=2000)))
    promoted, rolled_back = (first == 1).mean(), (first == 2).mean()
    assert promoted <= RULE.alpha / 2 + 0.01
    assert promoted + rolled_back <= RULE.alpha


def test_the_canary_checked_after_every_label_rarely_promotes():
    paths = canary_paths(2, 300, 20000, share=0.1, delta=0.0)
    first = first_outcomes(canary_outcomes(*paths, CANARY))
    assert (first == 1).mean() + (first == 2).mean() <= CANARY.alpha


def test_the_confidence_sequence_covers_the_difference_at_every_label():
    """E+ and E- at the true difference stay under 2/alpha all the way in >= 1 - alpha of
    the experiments, for a challenger 3 points better."""
    n, b, c = shadow_paths(3, 200, 2000, d=0.10, delta=0.03)
    threshold = math.log(2 / RULE.alpha)
    missed = (log_capital(n, b, c, 0.03, 1, RULE) >= threshold).any(axis=1) | \
        (log_capital(n, b, c, 0.03, -1, RULE) >= threshold).any(axis=1)
    assert missed.mean() <= RULE.alpha


@pytest.mark.parametrize("delta,expected", [(0.05, "promote"), (-0.05, "rollback")])
def test_a_clearly_better_challenger_is_promoted_and_a_worse_one_rolled_back(delta, expected):
    n, b, c = shadow_paths(4, 50, 3000, d=0.10, delta=delta)
    assert {OUTCOMES[k] for k in first_outcomes(paired_outcomes(n, b, c, RULE))} == {expected}
    paths = canary_paths(5, 30, 20000, share=0.1, delta=delta)
    assert {OUTCOMES[k] for k in first_outcomes(canary_outcomes(*paths, CANARY))} == {expected}


# ---------------------------------------------------------------- the rule


def test_clear_counts_decide():
    assert decide(Paired(2000, 160, 80)).outcome == "promote"
    assert decide(Paired(2000, 80, 160)).outcome == "rollback"
    assert decide(Paired(2000, 120, 120)).outcome == "continue"
    assert decide(Unpaired(16000, 13870, 2000, 1794), CANARY).outcome == "promote"
    assert decide(Unpaired(16000, 13870, 2000, 1674), CANARY).outcome == "rollback"
    assert decide(Unpaired(16000, 13870, 2000, 1734), CANARY).outcome == "continue"


def test_no_decision_before_min_labels():
    assert decide(Paired(99, 60, 0)).outcome == "continue"
    assert decide(Paired(100, 60, 0)).outcome == "promote"
    assert decide(Unpaired(5000, 4200, 99, 99), CANARY).outcome == "continue"  # in each arm
    assert decide(Unpaired(5000, 4200, 100, 100), CANARY).outcome == "promote"


def test_min_effect_blocks_a_tiny_significant_gain():
    counts, far = Paired(200_000, 10_400, 9_600), Rule(max_labels=10 ** 7)  # +0.004
    blocked = decide(counts, far)
    assert blocked.lower > 0 and blocked.outcome == "continue"
    assert "min_effect" in blocked.reason
    assert decide(counts, Rule(max_labels=10 ** 7, min_effect=0.003)).outcome == "promote"
    assert decide(counts, Rule(max_labels=200_000)).outcome == "stop_no_difference"
    canary = Unpaired(1_800_000, 1_560_600, 200_000, 174_200)  # +0.004
    assert decide(canary, far).outcome == "continue" and decide(canary, far).lower > 0
    assert decide(canary, Rule(max_labels=10 ** 7, min_effect=0.003)).outcome == "promote"


def test_the_horizon_stops_with_no_difference():
    assert decide(Paired(4999, 250, 250)).outcome == "continue"
    stopped = decide(Paired(5000, 250, 250))
    assert stopped.outcome == "stop_no_difference" and "horizon" in stopped.reason
    assert decide(Unpaired(17999, 15600, 2000, 1734), CANARY).outcome == "continue"
    assert decide(Unpaired(18000, 15600, 2000, 1734), CANARY).outcome == "stop_no_difference"


def test_the_decision_is_a_pure_function_of_the_counts():
    rng = np.random.default_rng(6)
    champion = rng.random(600) < 0.867
    challenger = np.where(rng.random(600) < 0.1, ~champion, champion)
    one_by_one, batches = SequentialTest(), SequentialTest()
    for a, z in zip(champion, challenger, strict=True):
        last = one_by_one.add_pairs(a, z)
    for part in np.array_split(np.arange(600), 7):
        batched = batches.add_pairs(champion[part], challenger[part])
    direct = decide(Paired.from_outcomes(champion, challenger))
    assert last == batched == direct == decide(Paired.from_outcomes(champion, challenger))
    assert one_by_one.p_min == pytest.approx(batches.p_min) and one_by_one.p_min <= 1
    # the vectorised rule (what a simulation or a controller over many runs uses) agrees
    n = rng.integers(1, 6000, 300)
    b = rng.binomial(n, rng.uniform(0.03, 0.08, n.size))
    c = rng.binomial(n - b, rng.uniform(0.03, 0.08, n.size))
    decisions = [decide(Paired(int(x), int(y), int(z))) for x, y, z in zip(n, b, c, strict=True)]
    assert [OUTCOMES[k] for k in paired_outcomes(n, b, c, RULE)] == [d.outcome for d in decisions]
    # ... and promotes exactly when the confidence sequence lies above 0 (and the gain is
    # worth it), rolls back exactly when it lies below
    for d in decisions:
        ready = d.labels >= RULE.min_labels
        assert (d.outcome == "promote") == (ready and d.lower > 0 and d.effect >= RULE.min_effect)
        assert (d.outcome == "rollback") == (ready and d.upper < 0)
    assert {d.outcome for d in decisions} >= {"promote", "rollback", "continue"}


def test_canary_updates_match_the_counts():
    rng = np.random.default_rng(7)
    to_challenger = rng.random(3000) < 0.1
    right = rng.random(3000) < 0.87
    test = SequentialTest(CANARY, mode="canary")
    for part in np.array_split(np.arange(3000), 5):
        decision = test.add_canary(right[part], to_challenger[part])
    counts = Unpaired(int((~to_challenger).sum()), int((right & ~to_challenger).sum()),
                      int(to_challenger.sum()), int((right & to_challenger).sum()))
    assert test.counts == counts and decision == decide(counts, CANARY)


def test_the_decision_as_a_record():
    record = decide(Paired(2000, 160, 80)).as_dict()
    assert {"outcome", "mode", "n", "b", "c", "e_value", "p_value", "effect", "lower",
            "upper", "labels", "alpha", "min_effect", "reason"} <= set(record)
    assert json.loads(json.dumps(record)) == record
    with pytest.raises(ValueError):
        Paired(10, 8, 5)
    with pytest.raises(ValueError):
        Unpaired(10, 11, 0, 0)


def test_the_rule_reads_its_config():
    config = yaml.safe_load((ROOT / "params.yaml").read_text())["promotion"]
    assert Rule.from_config(config) == RULE
    assert Rule.from_config(config, "canary").max_labels == config["canary"]["max_labels"]
    # every field comes from its key, not from the defaults params.yaml happens to hold
    changed = {**config, "alpha": 0.1, "min_effect": 0.02, "min_labels": 50,
               "shadow": {**config["shadow"], "max_labels": 700, "bets": 3},
               "canary": {**config["canary"], "tau": 0.05}}
    assert Rule.from_config(changed, "shadow") == Rule(0.1, 0.02, 50, 700, 3, 0.05)
