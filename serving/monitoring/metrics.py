"""Prometheus metrics (`GET /metrics`): `ServiceMetrics`, the service's registry.

Every metric the service exports is made here: requests, latency, batches, tokens,
a next-word model's generation (tokens generated, time to first token, inter-token
latency, sequences per decoding step, sequences running and waiting), rejections,
reloads, the model being served, memory, the prediction log's counters.
What is computed at scrape time has a module of its own: input drift
(serving/monitoring/drift.py), live quality from the prediction log
(serving/monitoring/quality.py) and the promotion controller's latest decision
(serving/monitoring/promotion.py). With several server processes
(serving/processes/workers.py) the counters live in prometheus-client's multiprocess
files, which a scrape merges.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from serving.bundle import Bundle
from serving.monitoring.drift import DriftMonitor
from serving.monitoring.promotion import PromotionEvidence
from serving.monitoring.quality import LiveQuality
from serving.processes.workers import WorkerGroup, resident_bytes

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


@dataclass
class BatchStats:
    """What one model call did, for the metrics."""

    texts: int
    requests: int
    groups: int
    real_tokens: int
    padded_tokens: int
    seconds: float
    lengths: list[int]  # per text, for drift monitoring
    unknown: list[int]  # unknown tokens per text
    predicted: list[int]  # predicted class per text
    bundle: Bundle | None = None  # which model computed them (a reload may swap it)
    # per-item drift features: an image model's brightness and contrast, a next-word
    # model's surprisal of each prompt
    features: dict[str, list[float]] | None = None
    # a text classifier's token ids per text (serving/engine/inference.py `infer_ids`)
    encoded: list[list[int]] | None = None


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
        # a next-word model's decoding (serving/engine/generation.py)
        self.generated = Counter("textops_generated_tokens_total",
                                 "tokens generated (POST /generate)", registry=r)
        self.first_token = Histogram("textops_time_to_first_token_seconds",
                                     "from a generation's admission to its first token",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("textops_inter_token_seconds",
                                     "between consecutive tokens of a generation",
                                     buckets=TOKEN_BUCKETS, registry=r)
        self.step_sequences = Histogram("textops_decode_step_sequences",
                                        "sequences per decoding step (model call)",
                                        buckets=SIZE_BUCKETS, registry=r)
        self.running = Gauge("textops_running_sequences", "generations being decoded",
                             registry=r, multiprocess_mode="livesum")
        self.waiting = Gauge("textops_waiting_sequences", "generations waiting to join "
                             "the decoding steps", registry=r, multiprocess_mode="livesum")
        self.rejected = Counter("textops_rejected_total", "requests refused for load",
                                ["reason"], registry=r)
        self.reloads = Counter("textops_reloads_total", "bundle reloads", ["outcome"],
                               registry=r)
        # A gauge, not an Info: prometheus-client's multiprocess mode has no Info. 1 for
        # the bundle being served; with several workers, 0 for one served before.
        # `task`: alerts whose numbers differ by task (live accuracy) select by it
        self.model = Gauge("textops_model_info", "the bundle being served",
                           ["model_name", "precision", "version", "task"], registry=r,
                           multiprocess_mode="livemax")
        self.model_labels: tuple[str, str, str, str] | None = None
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
        # shadow mode (serving/engine/shadow.py), counted per text
        self.shadow = Counter("textops_shadow_texts", "texts the challenger scored in "
                              "shadow, or dropped when it fell behind, or failed; requests "
                              "it failed in canary mode", ["outcome"], registry=r)
        for outcome in ("scored", "dropped", "agreed", "failed"):
            self.shadow.labels(outcome)
        self.shadow_cpu = Counter("textops_shadow_cpu_seconds", "CPU time the shadow's "
                                  "challenger process spent scoring", registry=r)
        self.shadow_ids = Counter("textops_shadow_champion_ids", "texts the shadow took "
                                  "as the champion's token ids (the challenger's "
                                  "tokenizer.json is the same file), not tokenized again",
                                  registry=r)
        self.live_quality = LiveQuality()
        self.promotion = PromotionEvidence()  # the controller's latest decision
        # The collectors computed at scrape time, from this process's state (the live
        # figures come from the shared database, the decision from the registry, so
        # any worker's are everyone's).
        self.computed = (self.drift, self.live_quality, self.promotion)
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
        task = getattr(getattr(bundle, "task", None), "name", "")
        labels = (str(meta.get("model_name", "")), bundle.precision, str(meta["version"]),
                  str(task))
        if self.model_labels and self.model_labels != labels:
            self.model.labels(*self.model_labels).set(0)  # what a multiprocess file keeps
            if self.group is None:  # multiprocess mode cannot remove a series
                self.model.remove(*self.model_labels)
        self.model.labels(*labels).set(1)
        self.model_labels = labels
        self.drift.reset(meta.get("profile", {}).get("reference"), list(bundle.label_names),
                         model=bundle)
        self.live_quality.per_label = getattr(bundle, "decoder", None) is None

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_texts.observe(stats.texts)
        self.batch_requests.observe(stats.requests)
        self.inference.observe(stats.seconds)
        self.tokens.labels("real").inc(stats.real_tokens)
        self.tokens.labels("padded").inc(stats.padded_tokens)
        self.drift.observe(stats.bundle, stats.lengths, stats.unknown, stats.predicted,
                           stats.features)
