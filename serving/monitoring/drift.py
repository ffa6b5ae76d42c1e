"""Input drift, for `GET /metrics`: `DriftMonitor` and the `psi` it reports.

Drift compares a sliding window of recent texts with the training profile that the
bundle carries (`bundle.json` -> profile.reference), as population stability indices
(PSI; above about 0.2 is commonly read as a significant shift):
- token-length distribution, over the training deciles;
- unknown-token rate, as the two-bucket distribution (unknown, known) of tokens;
- predicted-class distribution, against the training class balance (a classifier's);
- for an image model, in place of the token figures: each image's brightness (mean
  pixel) and contrast (pixel standard deviation), over the training deciles;
- for a next-word model, beside the token figures: each prompt's surprisal, the mean
  negative log-probability per token that the model gives the prompt's own words,
  over the deciles of the validation documents' (deploy measures them with the
  bundle; pipeline/tasks/next_word/task.py). Prompts unlike the training text, or
  garbled ones, read as more surprising.

A reload starts the window over; batches that the old bundle finishes afterwards are
left out, since their classes and token ids are the old bundle's. With several server
processes (serving/processes/workers.py) each keeps a window of its own share of the texts and
a scrape sums the live workers' window summaries (bucket counts) of the same model.

`psi` is the pipeline's too: `make retrain`'s drift trigger (pipeline/loops/) computes
it as the service does.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import numpy as np
from prometheus_client.core import GaugeMetricFamily

from serving.bundle.tensors import length_counts

# Per-item drift features, as a profile's reference names them: an image model's
# (pipeline/tasks/image_classification/preprocess.py computes them the same way) and a
# next-word model's (serving/bundle/decoding.py `topk_surprisal`).
ITEM_FEATURES = {"brightness": "image brightness", "contrast": "image contrast",
                 "surprisal": "prompt surprisal per token"}


def psi(actual: np.ndarray, expected: np.ndarray, floor: float = 1e-4) -> float:
    """Population stability index of two distributions over the same buckets."""
    a = np.clip(np.asarray(actual, dtype=float), floor, None)
    e = np.clip(np.asarray(expected, dtype=float), floor, None)
    a, e = a / a.sum(), e / e.sum()
    return float(np.sum((a - e) * np.log(a / e)))


class DriftMonitor:
    """Recent inputs and predictions, compared with the training reference on scrape.

    `others`, when several workers serve, returns their window summaries (see
    `summary`); a scrape merges those of the same model version with this one's."""

    def __init__(self, window: int, others: Callable[[], list[dict]] | None = None):
        self.window = window
        self.others = others or (lambda: [])
        self.lock = threading.Lock()
        self.observed = 0  # observations so far: tells a publisher whether to publish
        self.reset(None, [], model=None)

    def reset(self, reference: dict | None, label_names: list[str], model: object) -> None:
        """Start over for a new bundle (its own reference and classes); `model` names
        it, and from now on only observations of that model count."""
        with self.lock:
            self.reference, self.label_names, self.model = reference, label_names, model
            self.version = getattr(model, "version", None)
            self.lengths: deque[int] = deque(maxlen=self.window)
            self.unknown: deque[int] = deque(maxlen=self.window)
            self.predicted: deque[int] = deque(maxlen=self.window)
            self.features = {name: deque(maxlen=self.window) for name in ITEM_FEATURES}
            self.observed += 1

    def observe(self, model: object, lengths: list[int], unknown: list[int],
                predicted: list[int], features: dict[str, list[float]] | None = None) -> None:
        """One batch's figures; `features`: per-item features (ITEM_FEATURES)."""
        with self.lock:
            if model is not self.model:  # finished on a bundle swapped out since
                return
            self.lengths.extend(lengths)
            self.unknown.extend(unknown)
            self.predicted.extend(predicted)
            for name, values in (features or {}).items():
                self.features[name].extend(values)
            self.observed += 1

    def summary(self) -> dict:
        """The window as counts (what PSI needs, and what other workers can add up)."""
        with self.lock:
            lengths, unknown = np.array(self.lengths), np.array(self.unknown)
            predicted, reference = np.array(self.predicted, dtype=np.int64), self.reference
            classes, version = len(self.label_names), self.version
            features = {name: np.array(values) for name, values in self.features.items()}
        reference = reference or {}
        edges = reference["length"]["edges"] if "length" in reference else []
        return {"model": version, "texts": max(len(predicted), len(lengths)),
                "lengths": length_counts(lengths, edges).tolist() if len(lengths) else [],
                "unknown": int(unknown.sum()), "tokens": int(lengths.sum()),
                "predicted": np.bincount(predicted, minlength=classes).tolist(),
                **{name: length_counts(values, reference[name]["edges"]).tolist()
                   for name, values in features.items() if name in reference and len(values)}}

    def merged(self) -> dict:
        """This window's summary plus the other workers' of the same model."""
        total = self.summary()
        for other in self.others():
            if other.get("model") != total["model"] or not other.get("texts"):
                continue
            if not total["texts"]:
                total = {**other}
                continue
            total["texts"] += other["texts"]
            total["unknown"] += other["unknown"]
            total["tokens"] += other["tokens"]
            total["lengths"] = np.add(total["lengths"], other["lengths"]).tolist()
            total["predicted"] = np.add(total["predicted"], other["predicted"]).tolist()
            for name in ITEM_FEATURES:
                if name in other:
                    total[name] = np.add(total.get(name, 0), other[name]).tolist()
        return total

    def collect(self):
        window, reference, names = self.merged(), self.reference, list(self.label_names)
        yield GaugeMetricFamily("textops_drift_window_texts",
                                "texts in the drift window", value=window["texts"])
        if reference is None or window["texts"] == 0:
            return
        if "length" in reference:  # a text model's
            yield from self.token_drift(window, reference)
        for name, what in ITEM_FEATURES.items():
            if name in reference and name in window:
                yield GaugeMetricFamily(f"textops_drift_{name}_psi",
                                        f"PSI of {what} vs the reference",
                                        value=psi(window[name], reference[name]["shares"]))
        if "class_shares" not in reference:  # a next-word model has no classes
            return
        counts = np.asarray(window["predicted"])
        share = GaugeMetricFamily("textops_predicted_class_share",
                                  "share of each predicted class in the window",
                                  labels=["label"])
        for name, count in zip(names, counts, strict=True):
            share.add_metric([name], float(count / window["texts"]))
        yield share
        yield GaugeMetricFamily("textops_drift_predicted_class_psi",
                                "PSI of predicted classes vs the training class balance",
                                value=psi(counts, reference["class_shares"]))

    @staticmethod
    def token_drift(window: dict, reference: dict):
        """A text model's input drift: token lengths and the unknown-token rate."""
        yield GaugeMetricFamily("textops_drift_length_psi",
                                "PSI of token lengths vs training",
                                value=psi(window["lengths"], reference["length"]["shares"]))
        rate = window["unknown"] / max(window["tokens"], 1)
        yield GaugeMetricFamily("textops_unknown_token_rate",
                                "share of unknown tokens in the window", value=float(rate))
        expected_rate = reference["unk_rate"]
        yield GaugeMetricFamily("textops_drift_unknown_token_psi",
                                "PSI of the unknown-token rate vs training",
                                value=psi([rate, 1 - rate], [expected_rate, 1 - expected_rate]))
