"""Prometheus metrics (`GET /metrics`), input drift included.

Drift compares a sliding window of recent texts with the training profile that the
bundle carries (`bundle.json` -> profile.reference), as population stability indices
(PSI; above about 0.2 is commonly read as a significant shift):
- token-length distribution, over the training deciles;
- unknown-token rate, as the two-bucket distribution (unknown, known) of tokens;
- predicted-class distribution, against the training class balance.

A reload starts the window over; batches that the old bundle finishes afterwards are
left out, since their classes and token ids are the old bundle's.

Live quality comes from the prediction log (serving/prediction_log.py): accuracy and
per-class recall over the latest `feedback_window` labels, computed in the database by
the log's own threads (so it survives a restart and never waits on a scrape), and the
share of logged answers that received a label.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily

from serving.batcher import BatchStats
from serving.bundle import Bundle
from serving.prediction_log import LiveStats
from serving.tensors import length_counts

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def psi(actual: np.ndarray, expected: np.ndarray, floor: float = 1e-4) -> float:
    """Population stability index of two distributions over the same buckets."""
    a = np.clip(np.asarray(actual, dtype=float), floor, None)
    e = np.clip(np.asarray(expected, dtype=float), floor, None)
    a, e = a / a.sum(), e / e.sum()
    return float(np.sum((a - e) * np.log(a / e)))


class DriftMonitor:
    """Recent inputs and predictions, compared with the training reference on scrape."""

    def __init__(self, window: int):
        self.window = window
        self.lock = threading.Lock()
        self.reset(None, [], model=None)

    def reset(self, reference: dict | None, label_names: list[str], model: object) -> None:
        """Start over for a new bundle (its own reference and classes); `model` names
        it, and from now on only observations of that model count."""
        with self.lock:
            self.reference, self.label_names, self.model = reference, label_names, model
            self.lengths: deque[int] = deque(maxlen=self.window)
            self.unknown: deque[int] = deque(maxlen=self.window)
            self.predicted: deque[int] = deque(maxlen=self.window)

    def observe(self, model: object, lengths: list[int], unknown: list[int],
                predicted: list[int]) -> None:
        with self.lock:
            if model is not self.model:  # finished on a bundle swapped out since
                return
            self.lengths.extend(lengths)
            self.unknown.extend(unknown)
            self.predicted.extend(predicted)

    def collect(self):
        with self.lock:
            lengths, unknown = np.array(self.lengths), np.array(self.unknown)
            predicted, reference = np.array(self.predicted), self.reference
            names = list(self.label_names)
        yield GaugeMetricFamily("textops_drift_window_texts",
                                "texts in the drift window", value=len(lengths))
        if reference is None or len(lengths) == 0:
            return
        shares = length_counts(lengths, reference["length"]["edges"])
        yield GaugeMetricFamily("textops_drift_length_psi",
                                "PSI of token lengths vs training",
                                value=psi(shares, reference["length"]["shares"]))
        rate = unknown.sum() / max(lengths.sum(), 1)
        yield GaugeMetricFamily("textops_unknown_token_rate",
                                "share of unknown tokens in the window", value=float(rate))
        expected_rate = reference["unk_rate"]
        yield GaugeMetricFamily("textops_drift_unknown_token_psi",
                                "PSI of the unknown-token rate vs training",
                                value=psi([rate, 1 - rate], [expected_rate, 1 - expected_rate]))
        counts = np.bincount(predicted, minlength=len(names))
        share = GaugeMetricFamily("textops_predicted_class_share",
                                  "share of each predicted class in the window",
                                  labels=["label"])
        for name, count in zip(names, counts, strict=True):
            share.add_metric([name], float(count / len(predicted)))
        yield share
        yield GaugeMetricFamily("textops_drift_predicted_class_psi",
                                "PSI of predicted classes vs the training class balance",
                                value=psi(counts, reference["class_shares"]))


class LiveQuality:
    """The latest live-quality figures the prediction log computed, for scrapes."""

    def __init__(self):
        self.stats: LiveStats | None = None  # None: no log, or not read yet
        self.lock = threading.Lock()

    def update(self, stats: LiveStats) -> None:
        """Keep `stats` unless a reading begun later is already there (the writer's
        periodic reading and a feedback request's may finish out of order)."""
        with self.lock:
            if self.stats is None or stats.as_of >= self.stats.as_of:
                self.stats = stats  # a scrape sees the old figures or the new

    def collect(self):
        stats = self.stats
        if stats is None:
            return
        yield GaugeMetricFamily("textops_live_labels",
                                "labels the live accuracy rests on", value=stats.labels)
        if stats.accuracy is not None:
            yield GaugeMetricFamily("textops_live_accuracy",
                                    "accuracy over the latest labels", value=stats.accuracy)
            recall = GaugeMetricFamily("textops_live_recall",
                                       "recall of each labelled class over the latest labels",
                                       labels=["label"])
            for name, value in stats.recall.items():
                recall.add_metric([name], value)
            yield recall
        if stats.share is not None:
            yield GaugeMetricFamily("textops_feedback_share",
                                    "share of logged answers that received a label",
                                    value=stats.share)


class ServiceMetrics:
    """Every metric the service exports, in its own registry."""

    def __init__(self, drift_window: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("textops_requests_total", "HTTP requests",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("textops_request_seconds", "request latency",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("textops_queue_depth", "texts waiting for the model",
                                 registry=r)
        self.batch_texts = Histogram("textops_batch_texts", "texts per model call",
                                     buckets=SIZE_BUCKETS, registry=r)
        self.batch_requests = Histogram("textops_batch_requests", "requests per model call",
                                        buckets=SIZE_BUCKETS, registry=r)
        self.inference = Histogram("textops_inference_seconds",
                                   "tokenization and model time per call",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("textops_tokens_total", "tokens run through the model",
                              ["kind"], registry=r)
        self.rejected = Counter("textops_rejected_total", "requests refused for load",
                                ["reason"], registry=r)
        self.reloads = Counter("textops_reloads_total", "bundle reloads", ["outcome"],
                               registry=r)
        self.model = Info("textops_model", "the bundle being served", registry=r)
        self.drift = DriftMonitor(drift_window)
        r.register(self.drift)
        # the prediction log's, counted per text
        self.log_written = Counter("textops_prediction_log_written",
                                   "predictions written to the log", registry=r)
        self.log_dropped = Counter("textops_prediction_log_dropped",
                                   "predictions not logged: queue full, or a database error",
                                   ["reason"], registry=r)
        for reason in ("queue_full", "error"):
            self.log_dropped.labels(reason)
        self.feedback = Counter("textops_feedback", "labels accepted by POST /feedback",
                                registry=r)
        self.live_quality = LiveQuality()
        r.register(self.live_quality)

    def set_model(self, bundle: Bundle) -> None:
        meta = bundle.meta
        self.model.info({"version": str(meta["version"]),
                         "model_name": str(meta.get("model_name", "")),
                         "precision": bundle.precision})
        self.drift.reset(meta.get("profile", {}).get("reference"), list(bundle.label_names),
                         model=bundle)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_texts.observe(stats.texts)
        self.batch_requests.observe(stats.requests)
        self.inference.observe(stats.seconds)
        self.tokens.labels("real").inc(stats.real_tokens)
        self.tokens.labels("padded").inc(stats.padded_tokens)
        self.drift.observe(stats.bundle, stats.lengths, stats.unknown, stats.predicted)
