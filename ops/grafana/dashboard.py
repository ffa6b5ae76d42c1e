"""The Grafana dashboard of the service's /metrics (serving/monitoring/metrics.py),
generated: `python ops/grafana/dashboard.py` writes ops/grafana/textops-dashboard.json,
`--check` fails when that file is not what this script writes.

The panels are declared here, not drawn in Grafana and exported: each is its
PromQL and a few display settings, and the JSON around them (ids, grid positions, the
data source on every query) is made the same way for all. tests/ops/test_dashboard.py
checks that every metric a panel queries is one a running service exports.

Three variables choose what the panels show: `datasource` (any Prometheus data source,
picked on import), `job` (by default "textops", the job ops/prometheus/prometheus.yml
and ops/k8s/monitoring/ scrape the service as) and `instance` (one replica, or all).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "textops-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
S = 'job=~"$job", instance=~"$instance"'  # every query's selector
R = "$__rate_interval"  # Grafana's window for rate(): at least four scrapes
WIDTH = 24  # Grafana's grid


def rate(metric: str, by: str = "", extra: str = "") -> str:
    """Per-second increase of a counter (or a histogram's series) summed over the
    selected replicas, `by` the labels named."""
    grouping = f" by ({by}) " if by else ""
    return f"sum{grouping}(rate({metric}{{{S}{extra}}}[{R}]))"


def ratio(counter: str, by: str, extra: str) -> str:
    """The share of `counter`'s increase that has the labels `extra` names."""
    return f"{rate(counter, by, extra)} / {rate(counter, by)}"


def quantile(q: float, histogram: str, by: str = "") -> str:
    """The q-quantile of a histogram's observations over the window, `by` labels."""
    buckets = rate(histogram + "_bucket", ", ".join(["le", by] if by else ["le"]))
    return f"histogram_quantile({q}, {buckets})"


def mean(histogram: str, by: str = "") -> str:
    return f"{rate(histogram + '_sum', by)} / {rate(histogram + '_count', by)}"


def panel(title: str, targets: list[tuple[str, str]], unit: str = "short",
          width: int = 8, kind: str = "timeseries", description: str = "",
          thresholds: list[tuple[str, float | None]] | None = None) -> dict:
    """One panel; `targets` are (PromQL, legend) pairs; `thresholds` (colour, from
    value) are drawn as lines."""
    defaults: dict = {"unit": unit}
    if thresholds:
        defaults["thresholds"] = {"mode": "absolute", "steps": [
            {"color": color, "value": value} for color, value in thresholds]}
        defaults["custom"] = {"thresholdsStyle": {"mode": "line"}}
    return {
        "type": kind, "title": title, "description": description,
        "datasource": DATASOURCE, "gridPos": {"h": 8, "w": width},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
                     "legendFormat": legend} for i, (expr, legend) in enumerate(targets)],
    }


def table(title: str, expr: str, description: str) -> dict:
    """The series an instant query finds, one row each, their labels as columns."""
    found = panel(title, [(expr, "")], kind="table", description=description)
    found["targets"][0].update(format="table", instant=True)
    found["options"] = {"showHeader": True}
    found["transformations"] = [{"id": "organize", "options": {
        "excludeByName": {"Time": True, "Value": True, "__name__": True}}}]
    return found


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": {"h": 1, "w": WIDTH}}


PANELS = [
    row("Traffic"),
    panel("Requests by route and status",
          [(rate("textops_requests_total", "route, status"), "{{route}} {{status}}")],
          unit="reqps"),
    panel("Error ratio by route",
          [(ratio("textops_requests_total", "route", f', status=~"{kind[0]}.."'),
            f"{{{{route}}}} {kind}") for kind in ("5xx", "4xx")], unit="percentunit"),
    panel("Requests refused for load",
          [(rate("textops_rejected_total", "reason"), "{{reason}}")], unit="reqps",
          description="queue_full: answered 503 (TEXTOPS_MAX_QUEUE texts already wait); "
                      "timeout: answered 504 after TEXTOPS_REQUEST_TIMEOUT_S."),
    row("Latency"),
    panel("Request latency by route",
          [(quantile(q, "textops_request_seconds", "route"), f"{{{{route}}}} p{int(q * 100)}")
           for q in (0.5, 0.9, 0.99)], unit="s", width=12),
    panel("Model call time", [(quantile(q, "textops_inference_seconds"), f"p{int(q * 100)}")
                              for q in (0.5, 0.99)]
          + [(mean("textops_inference_seconds"), "mean")], unit="s", width=12,
          description="Tokenization and the model, per call (a batch of texts)."),
    row("Batching"),
    panel("Texts per model call",
          [(quantile(0.5, "textops_batch_texts"), "p50"),
           (quantile(0.9, "textops_batch_texts"), "p90"),
           (mean("textops_batch_texts"), "mean")],
          width=6, description="Micro-batching at work: texts of concurrent requests "
                               "share a call."),
    panel("Requests per model call and calls per second",
          [(mean("textops_batch_requests"), "requests per call"),
           (rate("textops_batch_texts_count"), "calls per second")], width=6),
    panel("Texts waiting for the model",
          [(f"sum by (instance) (textops_queue_depth{{{S}}})", "{{instance}}")], width=6),
    panel("Padding share of the model's tokens",
          [("1 - " + rate("textops_tokens_total", extra=', kind="real"') + " / "
            + rate("textops_tokens_total", extra=', kind="padded"'), "padding")],
          unit="percentunit", width=6,
          description="Tokens the model ran that were padding: texts of different "
                      "lengths in one call."),
    row("Model"),
    table("Model served by each replica",
          f"max by (instance, model_name, version, precision) (textops_model_info{{{S}}} == 1)",
          "The bundle each replica serves now. Replicas follow a promotion one by one."),
    panel("Replicas serving each version",
          [(f"count by (version) (textops_model_info{{{S}}} == 1)", "version {{version}}")]),
    panel("Bundle reloads",
          [(f"sum by (outcome) (increase(textops_reloads_total{{{S}}}[{R}]))", "{{outcome}}")],
          description="refused: the new bundle failed to load or warm up; the old one "
                      "still serves."),
    row("Input drift"),
    panel("Drift: PSI against the training data",
          [(f"textops_drift_{signal}_psi{{{S}}}", f"{{{{instance}}}} {signal}")
           # a text classifier's three; an image model's brightness and contrast; a
           # next-word model's surprisal (a service reports its own task's)
           for signal in ("length", "unknown_token", "predicted_class", "brightness",
                          "contrast", "surprisal")],
          width=12, thresholds=[("green", None), ("red", 0.1)],
          description="Alerts (TextopsInputDrift) over 0.1 once the window holds 1,000 "
                      "texts. Each replica compares its own window."),
    panel("Drift window", [(f"textops_drift_window_texts{{{S}}}", "{{instance}}")],
          width=12, thresholds=[("red", None), ("green", 1000)],
          description="Texts each replica's PSI rests on; under 1,000 it is mostly noise."),
    panel("Predicted class share",
          [(f"avg by (label) (textops_predicted_class_share{{{S}}})", "{{label}}")],
          unit="percentunit", width=12),
    panel("Unknown-token rate",
          [(f"textops_unknown_token_rate{{{S}}}", "{{instance}}")],
          unit="percentunit", width=12),
    row("Live quality (from feedback)"),
    panel("Live accuracy", [(f"max by (job) (textops_live_accuracy{{{S}}})", "accuracy")],
          unit="percentunit", thresholds=[("red", None), ("green", 0.8)],
          description="Over the latest labels (TEXTOPS_FEEDBACK_WINDOW); alerts under "
                      "0.8 on 200 labels or more (TextopsLiveAccuracyLow)."),
    panel("Live recall per class",
          [(f"max by (label) (textops_live_recall{{{S}}})", "{{label}}")],
          unit="percentunit"),
    panel("Labels", [(f"max by (job) (textops_live_labels{{{S}}})", "labels accuracy rests on"),
                     (rate("textops_feedback_total"), "labels per second")]),
    panel("Share of answers labelled",
          [(f"max by (job) (textops_feedback_share{{{S}}})", "labelled")],
          unit="percentunit", width=12),
    panel("Prediction log",
          [(rate("textops_prediction_log_written_total"), "written"),
           (rate("textops_prediction_log_dropped_total", "reason"), "dropped: {{reason}}")],
          width=12,
          description="Dropped answers cannot be labelled (TextopsPredictionLogDropping)."),
    row("Processes"),
    panel("Replicas answering scrapes", [('sum(up{job=~"$job", instance=~"$instance"})', "up")],
          width=12),
    panel("Resident memory per server process",
          [(f"textops_worker_resident_bytes{{{S}}}", "{{instance}} {{pid}}")],
          unit="bytes", width=12),
]


def variable(name: str, label: str, query: str, **options) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "definition": query, "query": {"query": query, "refId": name},
            "refresh": 2, "sort": 1, "hide": 0, **options}


TEMPLATING = [
    {"name": "datasource", "label": "Data source", "type": "datasource",
     "query": "prometheus", "hide": 0, "refresh": 1, "current": {}},
    variable("job", "Job", "label_values(textops_model_info, job)",
             current={"text": "textops", "value": "textops"}),
    variable("instance", "Replica", 'label_values(textops_model_info{job=~"$job"}, instance)',
             multi=True, includeAll=True, allValue=".*",
             current={"text": "All", "value": "$__all"}),
]


def laid_out(panels: list[dict]) -> list[dict]:
    """Ids in order, and grid positions left to right, a new line when one is full."""
    x = y = height = 0
    for number, item in enumerate(panels, start=1):
        width = item["gridPos"]["w"]
        if item["type"] == "row" or x + width > WIDTH:
            x, y, height = 0, y + height, 0
        item["id"] = number
        item["gridPos"].update(x=x, y=y)
        x, height = x + width, max(height, item["gridPos"]["h"])
    return panels


def dashboard() -> dict:
    return {
        "uid": "textops", "title": "textops service", "tags": ["textops"],
        "description": "Generated by ops/grafana/dashboard.py: edit that, not this file.",
        "editable": True, "schemaVersion": 39, "version": 1, "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"}, "timezone": "browser",
        "graphTooltip": 1, "links": [], "annotations": {"list": []},
        "templating": {"list": TEMPLATING},
        "panels": laid_out(json.loads(json.dumps(PANELS))),  # a copy: the list stays as declared
    }


def rendered() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        if OUTPUT.read_text() != rendered():
            print(f"{OUTPUT} is out of date: run python ops/grafana/dashboard.py",
                  file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(rendered())
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
