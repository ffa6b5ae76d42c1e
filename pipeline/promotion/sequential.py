"""The challenger against the champion on labelled production traffic: a sequential
test that may be checked after every label (issue 29).

**Shadow (paired).** Both models answer each request; a labelled one gives X = +1 when
only the challenger was right (count b), -1 when only the champion was (c), else 0; the
accuracy difference is delta = E[X]. For a bet l in [-1/2, 1/2] the capital
K(l) = prod_i (1 + l (X_i - delta0)) = (1 + l(1-delta0))^b (1 - l(1+delta0))^c
(1 - l delta0)^(n-b-c) is a non-negative martingale from 1 whenever each X_i has
conditional mean delta0, whatever the discordance rate and however it drifts
(Waudby-Smith and Ramdas, "Estimating means of bounded random variables by betting",
JRSS B 2024); so are E+, the mean of K over a fixed grid of bets in (0, 1/2], and E-
over their negatives. At delta0 = 0 concordant pairs drop out and (1 + l)^b (1 - l)^c
is McNemar's exact likelihood ratio of a discordant win probability (1 + l)/2 against
1/2: E+ mixes them over alternatives in (1/2, 3/4].

**Canary (unpaired).** Each labelled request was answered by one model: the mixture
SPRT of Johari, Pekelis and Walsh ("Peeking at A/B tests", KDD 2017; "Always valid
inference", Operations Research 2022, with Koomen) on theta = p_challenger -
p_champion, with V = p(1-p)(1/n_champion + 1/n_challenger), p the pooled accuracy, and
the mixture theta ~ N(0, tau^2): L = sqrt(V/(V+tau^2)) exp(tau^2 est^2 / (2V(V+tau^2))).
In the information time 1/V, est/V is close to a Brownian motion with drift theta, for
which L is exactly a martingale (Robbins 1970); with the plug-in V the guarantee is
asymptotic, which bench/bench_promotion.py checks at these sizes.

**Why checking after every label is fine.** By Ville's inequality a non-negative
martingale from 1 ever reaches 1/a with probability <= a: under equal accuracy E+ (or
E-) ever reaches 2/alpha with probability <= alpha/2, L reaches 1/alpha with
probability <= alpha, however often the counts are read and whenever the experiment
stops. The e-value is e = max(E+, E-)/2 (below the martingale (E+ + E-)/2) or L;
p = min(1, 1/e) is valid at any stopping time. Inverting the tests gives a (1 - alpha)
confidence sequence (CS), bounds on the difference that hold at all times at once:
shadow, lower = inf{delta0: E+(delta0) < 2/alpha} (E+ falls with delta0: a search),
upper likewise from E-; canary, est +- sqrt(V(V+tau^2)/tau^2 log((V+tau^2)/(V alpha^2))).
Each excludes 0 exactly when its test rejects.

**The rule** (`decide`: a pure function of the counts, so a controller re-reading the
log decides the same way). Nothing before `min_labels` (shadow: pairs; canary: in each
arm). Then rollback when upper < 0 (the challenger is worse); promote when lower > 0
and the estimate >= `min_effect`; at `max_labels` (the horizon) without either,
stop_no_difference (the challenger retired too); else continue. A promotion needs
lower > 0, so under equal accuracy any wrong promotion or rollback has probability
<= alpha; `min_effect` only removes promotions (a gain too small to pay for a switch)
and costs no validity, but does not certify the gain (lower >= min_effect would, much
later). A significant gain below it keeps collecting: the estimate may still reach it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

CONTINUE, PROMOTE, ROLLBACK, STOP = "continue", "promote", "rollback", "stop_no_difference"
OUTCOMES = (CONTINUE, PROMOTE, ROLLBACK, STOP)  # *_outcomes return indices into these
MAX_BET = 0.5  # keeps every factor of K non-negative for any delta0 in [-1, 1]


@dataclass(frozen=True)
class Rule:
    """conf/promotion/default.yaml, for one mode (`from_config`)."""

    alpha: float = 0.05
    min_effect: float = 0.005
    min_labels: int = 100
    max_labels: int = 5000
    bets: int = 20  # shadow: the grid of bets, MAX_BET * k / bets for k = 1 .. bets
    tau: float = 0.03  # canary: the normal mixture's standard deviation

    @classmethod
    def from_config(cls, config: Mapping, mode: str | None = None) -> Rule:
        mode = mode or config["mode"]
        return cls(float(config["alpha"]), float(config["min_effect"]),
                   int(config["min_labels"]), int(config[mode]["max_labels"]),
                   int(config["shadow"]["bets"]), float(config["canary"]["tau"]))


@dataclass(frozen=True)
class Paired:
    """Shadow: n labelled requests both answered; b only the challenger right, c only
    the champion."""

    n: int
    b: int
    c: int

    def __post_init__(self):
        if min(self.b, self.c) < 0 or self.b + self.c > self.n:
            raise ValueError(f"not shadow counts: {self}")

    @classmethod
    def from_outcomes(cls, champion_right, challenger_right) -> Paired:
        a, z = np.asarray(champion_right, bool), np.asarray(challenger_right, bool)
        return cls(len(a), int((z & ~a).sum()), int((a & ~z).sum()))


@dataclass(frozen=True)
class Unpaired:
    """Canary: labelled requests each model answered, and how many it got right."""

    champion_n: int
    champion_right: int
    challenger_n: int
    challenger_right: int

    def __post_init__(self):
        if not (0 <= self.champion_right <= self.champion_n
                and 0 <= self.challenger_right <= self.challenger_n):
            raise ValueError(f"not canary counts: {self}")


@dataclass(frozen=True)
class Decision:
    outcome: str  # one of OUTCOMES
    mode: str  # shadow | canary
    labels: int  # labelled requests the decision rests on
    counts: dict
    e_value: float
    p_value: float  # min(1, 1/e_value)
    effect: float  # challenger accuracy - champion accuracy, estimated
    lower: float  # the (1 - alpha) confidence sequence's bounds on it
    upper: float
    alpha: float
    min_effect: float
    reason: str

    def as_dict(self) -> dict:  # flat, for MLflow, registry tags and the model card
        out = asdict(self)
        return {**out.pop("counts"), **out}


def bets(rule: Rule) -> np.ndarray:
    return MAX_BET * np.arange(1, rule.bets + 1) / rule.bets


def log_capital(n, b, c, delta0, side: int, rule: Rule) -> np.ndarray:
    """log E+ (side 1) or log E- (side -1) at delta0, for arrays of counts or of delta0."""
    d = np.clip(np.asarray(delta0, float), -1 + 1e-9, 1 - 1e-9)[..., None]
    lam = side * bets(rule)
    n, b, c = (np.asarray(x, float)[..., None] for x in (n, b, c))
    terms = (b * np.log1p(lam * (1 - d)) + c * np.log1p(-lam * (1 + d))
             + (n - b - c) * np.log1p(-lam * d))
    top = terms.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(terms - top).mean(axis=-1, keepdims=True)))[..., 0]


def canary_stats(nA, xA, nB, xB, rule: Rule):
    """(estimate, log L, lower, upper) for arrays of canary counts."""
    nA, xA, nB, xB = (np.asarray(x, float) for x in (nA, xA, nB, xB))
    est = xB / np.maximum(nB, 1) - xA / np.maximum(nA, 1)
    pooled = (xA + xB) / np.maximum(nA + nB, 1)
    v = np.maximum(pooled * (1 - pooled), 1e-12) * (1 / np.maximum(nA, 1) + 1 / np.maximum(nB, 1))
    t2 = rule.tau ** 2
    log_lr = 0.5 * np.log(v / (v + t2)) + t2 * est ** 2 / (2 * v * (v + t2))
    half = np.sqrt(v * (v + t2) / t2 * np.log((v + t2) / (v * rule.alpha ** 2)))
    return est, log_lr, est - half, est + half


def _codes(labels, started, est, better, worse, rule: Rule) -> np.ndarray:
    code = np.zeros(np.shape(est), np.int8)
    code[started & (labels >= rule.max_labels)] = OUTCOMES.index(STOP)
    code[started & better & (est >= rule.min_effect)] = OUTCOMES.index(PROMOTE)
    code[started & worse] = OUTCOMES.index(ROLLBACK)
    return code


def paired_outcomes(n, b, c, rule: Rule) -> np.ndarray:
    """The rule's outcome (an index into OUTCOMES) for arrays of shadow counts."""
    n, b, c = np.broadcast_arrays(*(np.asarray(x) for x in (n, b, c)))
    threshold = np.log(2 / rule.alpha)
    return _codes(n, n >= rule.min_labels, (b - c) / np.maximum(n, 1),
                  log_capital(n, b, c, 0.0, 1, rule) >= threshold,  # lower > 0
                  log_capital(n, b, c, 0.0, -1, rule) >= threshold, rule)  # upper < 0


def canary_outcomes(nA, xA, nB, xB, rule: Rule) -> np.ndarray:
    """The rule's outcome (an index into OUTCOMES) for arrays of canary counts."""
    est, _, lower, upper = canary_stats(nA, xA, nB, xB, rule)
    started = np.minimum(nA, nB) >= rule.min_labels
    return _codes(np.add(nA, nB), started, est, lower > 0, upper < 0, rule)


def _bound(counts: Paired, side: int, rule: Rule) -> float:
    """lower (side 1): inf{delta0: E+(delta0) < 2/alpha}; upper (side -1): the sup of
    those with E-(delta0) < 2/alpha. E+ falls and E- rises with delta0: a grid search
    from the end of [-1, 1] rejected first, narrowed five times (to 1e-7)."""
    ends = [-float(side), float(side)]
    for _ in range(5):
        grid = np.linspace(*ends, 33)
        rejected = log_capital(counts.n, counts.b, counts.c, grid, side, rule) >= np.log(
            2 / rule.alpha)
        if not rejected[0]:
            return float(grid[0])
        k = int(np.argmin(rejected)) if not rejected.all() else grid.size - 1
        ends = [grid[k - 1], grid[k]]
    return float(ends[1])


def evidence(counts: Paired | Unpaired, rule: Rule):
    """(mode, labels, log e-value, estimate, lower, upper, outcome index)."""
    if isinstance(counts, Paired):
        n, b, c = counts.n, counts.b, counts.c
        log_e = max(float(log_capital(n, b, c, 0.0, s, rule)) for s in (1, -1)) - np.log(2)
        return ("shadow", n, log_e, (b - c) / max(n, 1), _bound(counts, 1, rule),
                _bound(counts, -1, rule), int(paired_outcomes(n, b, c, rule)))
    k = tuple(asdict(counts).values())
    est, log_lr, lower, upper = map(float, canary_stats(*k, rule))
    return "canary", k[0] + k[2], log_lr, est, lower, upper, int(canary_outcomes(*k, rule))


def decide(counts: Paired | Unpaired, rule: Rule = Rule()) -> Decision:
    """The rule's decision on these counts (the module's docstring), with its evidence."""
    mode, labels, log_e, est, lower, upper, code = evidence(counts, rule)
    have = labels if mode == "shadow" else min(counts.champion_n, counts.challenger_n)
    outcome = OUTCOMES[int(code)]
    e, p = float(np.exp(np.clip(log_e, -700, 700))), float(np.exp(min(-log_e, 0.0)))
    shown = (f"{est:+.4f}, {1 - rule.alpha:.0%} CS [{lower:+.4f}, {upper:+.4f}], e = {e:.3g}, "
             f"{labels} labels")
    if have < rule.min_labels:
        why = f"{have} of the {rule.min_labels} labels needed before any decision" + (
            " in each arm" if mode == "canary" else "")
    elif outcome in (PROMOTE, ROLLBACK):
        why = f"challenger {'better' if outcome == PROMOTE else 'worse'}: {shown}"
    elif lower > 0:
        why = (f"{'horizon reached, ' if outcome == STOP else ''}challenger better but "
               f"by less than min_effect {rule.min_effect}: {shown}")
    else:
        why = (f"{'horizon reached, ' if outcome == STOP else ''}no difference shown: "
               f"{shown} of {rule.max_labels}")
    return Decision(outcome, mode, labels, asdict(counts), e, p, est, lower, upper,
                    rule.alpha, rule.min_effect, why)


class SequentialTest:
    """Counts updated as labels arrive, one or a batch at a time, with the running
    minimum of the always-valid p-value over every label seen (also valid); the
    decision depends on the counts alone."""

    def __init__(self, rule: Rule = Rule(), mode: str = "shadow"):
        self.rule, self.p_min = rule, 1.0
        self.counts = Paired(0, 0, 0) if mode == "shadow" else Unpaired(0, 0, 0, 0)

    def add_pairs(self, champion_right, challenger_right) -> Decision:
        a = np.atleast_1d(np.asarray(champion_right, bool))
        z = np.atleast_1d(np.asarray(challenger_right, bool))
        n = self.counts.n + np.arange(1, a.size + 1)
        b, c = self.counts.b + np.cumsum(z & ~a), self.counts.c + np.cumsum(a & ~z)
        log_e = np.maximum(log_capital(n, b, c, 0.0, 1, self.rule),
                           log_capital(n, b, c, 0.0, -1, self.rule)) - np.log(2)
        self.counts = Paired(int(n[-1]), int(b[-1]), int(c[-1]))
        return self._update(log_e)

    def add_canary(self, right, to_challenger) -> Decision:
        r = np.atleast_1d(np.asarray(right, bool))
        z = np.atleast_1d(np.asarray(to_challenger, bool))
        k = self.counts
        nA, xA = k.champion_n + np.cumsum(~z), k.champion_right + np.cumsum(r & ~z)
        nB, xB = k.challenger_n + np.cumsum(z), k.challenger_right + np.cumsum(r & z)
        self.counts = Unpaired(int(nA[-1]), int(xA[-1]), int(nB[-1]), int(xB[-1]))
        return self._update(canary_stats(nA, xA, nB, xB, self.rule)[1])

    def _update(self, log_e: np.ndarray) -> Decision:
        self.p_min = min(self.p_min, float(np.exp(-max(float(log_e.max()), 0.0))))
        return decide(self.counts, self.rule)
