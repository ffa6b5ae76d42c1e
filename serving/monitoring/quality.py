"""Live quality, for `GET /metrics`: the prediction log's latest figures.

Live quality comes from the prediction log (serving/predlog/): accuracy and
per-class recall over the latest `feedback_window` labels, computed in the database by
the log's own threads (so it survives a restart and never waits on a scrape), and the
share of logged answers that received a label. `LiveQuality` keeps the latest reading
(a `LiveStats`, serving/monitoring/live_stats.py) and shows it on scrapes.

For a next-word model the labels are words typed next: live accuracy is top-1
next-word accuracy, and there is no per-label recall (a series per word of a
vocabulary would swamp Prometheus).
"""

from __future__ import annotations

import threading

from prometheus_client.core import GaugeMetricFamily

from serving.monitoring.live_stats import LiveStats


class LiveQuality:
    """The latest live-quality figures the prediction log computed, for scrapes."""

    def __init__(self):
        self.stats: LiveStats | None = None  # None: no log, or not read yet
        self.lock = threading.Lock()
        self.per_label = True  # recall per label: a classifier's, not a next-word model's

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
        if stats.accuracy is not None and self.per_label:
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
