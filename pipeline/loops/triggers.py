"""When `make retrain` retrains: the signals read off the running service and its
prediction log, the drift thresholds for the live window, and every trigger with its
reason (`decide`). pipeline.loops.retrain acts on the decision and records it.

Triggers (`retrain` in conf/retrain/default.yaml), any one is enough:

- drift: a PSI of `/metrics` (token lengths, unknown-token rate, predicted classes;
  an image model's brightness and contrast; a next-word model's prompt surprisal)
  over its threshold, counted only once the drift window holds `drift.min_window`
  texts. A PSI has a spread under no change that shrinks with the window (with 100
  texts a threshold of 0.1 fires on unchanged data most of the time), so each
  threshold is calibrated for the live window's size on the served model's own
  training profile (`calibrate`), and never below `drift.min_psi`;
- live accuracy under `accuracy.floor`, once it rests on `accuracy.min_labels` labels;
- at least `new_labels.min` labelled answers since the last retraining;
- `--force`.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass, field

import numpy as np
from omegaconf import DictConfig
from prometheus_client.parser import text_string_to_metric_families

from serving.monitoring.drift import psi

# PSI gauges of /metrics, by the name the record gives them
DRIFT_METRICS = {"length": "textops_drift_length_psi",
                 "unknown_token": "textops_drift_unknown_token_psi",
                 "predicted_class": "textops_drift_predicted_class_psi",
                 "brightness": "textops_drift_brightness_psi",  # an image model's
                 "contrast": "textops_drift_contrast_psi",
                 "surprisal": "textops_drift_surprisal_psi"}  # a next-word model's
# the per-item features whose reference is decile bins, drawn from like the lengths
BINNED = ("brightness", "contrast", "surprisal")


@dataclass
class Signals:
    """What the service and its log say; None where it could not be read."""

    drift_window: int | None = None
    psi: dict[str, float] = field(default_factory=dict)
    live_accuracy: float | None = None
    live_labels: int | None = None
    new_labels: int | None = None
    labels_until: float | None = None  # the latest label's time in the log
    profile: dict | None = None  # the served model's training profile (drift reference)
    errors: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- reading the state


def fetch(url: str, timeout: float = 10) -> str:
    """The body of a GET (the standard library: the pipeline's install has no client)."""
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return answer.read().decode()


def scrape(service_url: str) -> dict[str, float]:
    """The unlabelled samples of the service's /metrics, by name."""
    return {sample.name: sample.value
            for family in text_string_to_metric_families(fetch(f"{service_url}/metrics"))
            for sample in family.samples if not sample.labels}


def read_service(signals: Signals, service_url: str) -> None:
    try:
        metrics = scrape(service_url)
        meta = json.loads(fetch(f"{service_url}/metadata"))
    except (OSError, ValueError) as err:  # URLError and HTTPError are OSErrors
        signals.errors.append(f"service {service_url}: {err}")
        return
    if "textops_drift_window_texts" in metrics:
        signals.drift_window = int(metrics["textops_drift_window_texts"])
    signals.psi = {name: metrics[gauge] for name, gauge in DRIFT_METRICS.items()
                   if gauge in metrics}
    signals.live_labels = int(metrics.get("textops_live_labels", 0))
    signals.live_accuracy = metrics.get("textops_live_accuracy")
    signals.profile = meta.get("profile")


def read_log(signals: Signals, log_url: str, since: float | None) -> None:
    from serving.predlog.reader import read_labelled
    from serving.predlog.store import PredictionLogError

    try:
        rows = read_labelled(log_url, since=since)
    except (PredictionLogError, OSError) as err:
        signals.errors.append(f"prediction log: {err}")
        return
    except Exception as err:  # noqa: BLE001 - sqlite3 / psycopg2 errors alike
        signals.errors.append(f"prediction log: {type(err).__name__}: {err}")
        return
    signals.new_labels = len(rows)
    signals.labels_until = max((r["created"] for r in rows), default=since)


# ---------------------------------------------------------------- thresholds


def calibrate(profile: dict, window: int, quantile: float, samples: int,
              seed: int = 0) -> dict[str, float]:
    """Each drift PSI's `quantile` under no change: windows of `window` texts drawn
    from the training profile's own distributions, scored as the service scores them
    (serving.monitoring.drift.psi).

    Token lengths, predicted classes and the binned features (an image's brightness
    and contrast, a prompt's surprisal): multinomial draws over the reference's bins
    and class shares, which is exactly drawing items from the reference (its bins are
    its own deciles). Unknown tokens: a binomial draw over the window's expected
    tokens at the reference rate; unknown tokens that cluster in a few texts spread
    wider than this, which `drift.min_psi` covers. Only what the reference holds is
    calibrated: each task's service reports those PSIs and no others.
    """
    reference = profile["reference"]
    rng = np.random.default_rng(seed)
    spread = {}
    if "unk_rate" in reference:
        rate = reference["unk_rate"]
        tokens = max(1, round(window * tokens_per_text(profile)))
        unknown = rng.binomial(tokens, rate, samples) / tokens
        spread["unknown_token"] = [psi([u, 1 - u], [rate, 1 - rate]) for u in unknown]
    binned = {name: np.asarray(reference[name]["shares"])
              for name in ("length", *BINNED) if name in reference}
    if "class_shares" in reference:
        binned["predicted_class"] = np.asarray(reference["class_shares"])
    for name, shares in binned.items():
        spread[name] = [psi(c, shares) for c in rng.multinomial(window, shares, samples)]
    return {name: float(np.quantile(values, quantile)) for name, values in spread.items()}


def tokens_per_text(profile: dict) -> float:
    """The mean tokens of a text the service is sent: a classifier's training text's,
    or a next-word model's typed prompt's (its reference says)."""
    reference = profile["reference"]
    if "mean_tokens" in reference:
        return reference["mean_tokens"]
    return profile["splits"]["train"]["tokens"]["mean"]


def thresholds(signals: Signals, drift: DictConfig) -> dict:
    """The PSI thresholds for the live window: calibrated, floored at `min_psi`."""
    if signals.profile is None or not signals.drift_window \
            or "reference" not in signals.profile:  # a bundle from before drift references
        return {}
    calibrated = calibrate(signals.profile, signals.drift_window, drift.quantile,
                           drift.samples)
    return {name: {"calibrated": value, "min_psi": drift.min_psi,
                   "threshold": max(value, drift.min_psi)}
            for name, value in calibrated.items()}


# ---------------------------------------------------------------- the decision


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def trigger(name: str, fired: bool, reason: str, **values) -> dict:
    return {"trigger": name, "fired": fired, "reason": reason, **values}


UNREAD = "the service's /metrics could not be read"


def drift_triggers(signals: Signals, cfg: DictConfig, limits: dict) -> list[dict]:
    window, least = signals.drift_window, cfg.drift.min_window
    if window is None:
        return [trigger("drift", False, UNREAD)]
    if window < least:
        return [trigger("drift", False, f"the drift window holds {window} texts, fewer "
                        f"than {least}: its PSIs are not trusted yet", window=window)]
    found = []
    for name, value in signals.psi.items():
        limit = limits.get(name)
        if limit is None:
            found.append(trigger(f"drift:{name}", False, f"{name} PSI {value:.4f}: the "
                                 "served bundle's profile has no reference to calibrate "
                                 "a threshold on", value=value, window=window))
            continue
        over = value > limit["threshold"]
        found.append(trigger(
            f"drift:{name}", over,
            f"{name} PSI {value:.4f} {'over' if over else 'within'} {limit['threshold']:.4f} "
            f"over {window} texts (no-change {cfg.drift.quantile:.0%} quantile "
            f"{limit['calibrated']:.4f}, floor {limit['min_psi']})",
            value=value, threshold=limit["threshold"], window=window))
    return found


def accuracy_trigger(signals: Signals, cfg: DictConfig) -> dict:
    labels, floor, least = signals.live_labels, cfg.accuracy.floor, cfg.accuracy.min_labels
    if signals.live_labels is None:
        return trigger("live_accuracy", False, UNREAD)
    if signals.live_accuracy is None or labels < least:
        return trigger("live_accuracy", False, f"live accuracy rests on {labels} labels, "
                       f"fewer than {least}", labels=labels)
    value = signals.live_accuracy
    low = value < floor
    return trigger("live_accuracy", low, f"live accuracy {value:.4f} "
                   f"{'under' if low else 'at or over'} the floor {floor} over {labels} labels",
                   value=value, threshold=floor, labels=labels)


def new_labels_trigger(signals: Signals, cfg: DictConfig, since: float | None) -> dict:
    count, least = signals.new_labels, cfg.new_labels.min
    when = "ever" if since is None else f"since the last retraining ({iso(since)})"
    if count is None:
        return trigger("new_labels", False, "the prediction log could not be read")
    return trigger("new_labels", count >= least, f"{count} labelled answers {when}, "
                   f"{'at least' if count >= least else 'fewer than'} {least}",
                   value=count, threshold=least)


def decide(signals: Signals, cfg: DictConfig, since: float | None,
           force: bool = False) -> tuple[list[dict], dict]:
    """Every trigger with its reason, and the thresholds used."""
    limits = thresholds(signals, cfg.drift)
    found = [*drift_triggers(signals, cfg, limits), accuracy_trigger(signals, cfg),
             new_labels_trigger(signals, cfg, since)]
    if force:
        found.append(trigger("force", True, "asked for with --force"))
    return found, limits
