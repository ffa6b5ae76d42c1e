"""Prometheus metrics (`GET /metrics`), input drift included.

Drift compares a sliding window of recent texts with the training profile that the
bundle carries (`bundle.json` -> profile.reference), as population stability indices
(PSI; above about 0.2 is commonly read as a significant shift):
- token-length distribution, over the training deciles;
- unknown-token rate, as the two-bucket distribution (unknown, known) of tokens;
- predicted-class distribution, against the training class balance.

A reload starts the window over; batches that the old bundle finishes afterwards are
left out, since their classes and token ids are the old bundle's. With several server
processes (serving/processes/workers.py) each keeps a window of its own share of the texts and
a scrape sums the live workers' window summaries (bucket counts) of the same model.

Live quality comes from the prediction log (serving/predlog/log.py): accuracy and
per-class recall over the latest `feedback_window` labels, computed in the database by
the log's own threads (so it survives a restart and never waits on a scrape), and the
share of logged answers that received a label.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from serving.engine.batcher import BatchStats
from serving.bundle import Bundle
from serving.predlog.log import LiveStats
from serving.bundle.tensors import length_counts
from serving.processes.workers import WorkerGroup, resident_bytes

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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
            self.observed += 1

    def observe(self, model: object, lengths: list[int], unknown: list[int],
                predicted: list[int]) -> None:
        with self.lock:
            if model is not self.model:  # finished on a bundle swapped out since
                return
            self.lengths.extend(lengths)
            self.unknown.extend(unknown)
            self.predicted.extend(predicted)
            self.observed += 1

    def summary(self) -> dict:
        """The window as counts (what PSI needs, and what other workers can add up)."""
        with self.lock:
            lengths, unknown = np.array(self.lengths), np.array(self.unknown)
            predicted, reference = np.array(self.predicted, dtype=np.int64), self.reference
            classes, version = len(self.label_names), self.version
        edges = reference["length"]["edges"] if reference else []
        return {"model": version, "texts": len(lengths),
                "lengths": length_counts(lengths, edges).tolist() if len(lengths) else [],
                "unknown": int(unknown.sum()), "tokens": int(lengths.sum()),
                "predicted": np.bincount(predicted, minlength=classes).tolist()}

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
        return total

    def collect(self):
        window, reference, names = self.merged(), self.reference, list(self.label_names)
        yield GaugeMetricFamily("textops_drift_window_texts",
                                "texts in the drift window", value=window["texts"])
        if reference is None or window["texts"] == 0:
            return
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
    """Every metric the service exports, in its own registry; with several workers
    (`group`), in prometheus-client's multiprocess files, which a scrape merges."""

    def __init__(self, drift_window: int, group: WorkerGroup | None = None):
        self.group = group
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("textops_requests_total", "HTTP requests",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("textops_request_seconds", "request latency",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("textops_queue_depth", "texts waiting for the model",
                                 registry=r, multiprocess_mode="livesum")
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
        # A gauge, not an Info: prometheus-client's multiprocess mode has no Info. 1 for
        # the bundle being served; with several workers, 0 for one served before.
        self.model = Gauge("textops_model_info", "the bundle being served",
                           ["model_name", "precision", "version"], registry=r,
                           multiprocess_mode="livemax")
        self.model_labels: tuple[str, str, str] | None = None
        self.resident = Gauge("textops_worker_resident_bytes",
                              "resident memory of each server process (label pid with "
                              "several workers)", registry=r, multiprocess_mode="liveall")
        self.drift = DriftMonitor(drift_window, group.drift_summaries if group else None)
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
        # The collectors computed at scrape time, from this process's state (the live
        # figures come from the shared database, so any worker's are everyone's).
        self.computed = (self.drift, self.live_quality)
        for collector in self.computed:
            r.register(collector)

    def exposition(self) -> bytes:
        """The text `/metrics` answers: this process's registry, or with several
        workers everything their files hold plus the computed collectors."""
        self.note_memory()  # this process's, now; the other workers' are seconds old
        if self.group is None:
            return generate_latest(self.registry)
        self.group.forget_dead()
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=str(self.group.directory))
        for collector in self.computed:
            merged.register(collector)
        return generate_latest(merged)

    def note_memory(self) -> None:
        if (resident := resident_bytes()) is not None:
            self.resident.set(resident)

    def set_model(self, bundle: Bundle) -> None:
        meta = bundle.meta
        labels = (str(meta.get("model_name", "")), bundle.precision, str(meta["version"]))
        if self.model_labels and self.model_labels != labels:
            self.model.labels(*self.model_labels).set(0)  # what a multiprocess file keeps
            if self.group is None:  # multiprocess mode cannot remove a series
                self.model.remove(*self.model_labels)
        self.model.labels(*labels).set(1)
        self.model_labels = labels
        self.drift.reset(meta.get("profile", {}).get("reference"), list(bundle.label_names),
                         model=bundle)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_texts.observe(stats.texts)
        self.batch_requests.observe(stats.requests)
        self.inference.observe(stats.seconds)
        self.tokens.labels("real").inc(stats.real_tokens)
        self.tokens.labels("padded").inc(stats.padded_tokens)
        self.drift.observe(stats.bundle, stats.lengths, stats.unknown, stats.predicted)
