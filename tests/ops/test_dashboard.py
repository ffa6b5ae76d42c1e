"""The Grafana dashboard (ops/grafana/): every metric its panels query is one a running
service exports, every query follows the job and replica chosen at the top, the
committed JSON is what ops/grafana/dashboard.py writes, and Prometheus parses it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import httpx
import pytest
import yaml
from conftest import answers, eventually, running_service, send_without_reading
from prometheus_client.parser import text_string_to_metric_families

from ops.grafana import dashboard
from serving.monitoring.drift import ITEM_FEATURES

PROMTOOL = shutil.which("promtool")
# Series Prometheus makes itself for every target, not the service.
SCRAPE_SERIES = {"up"}
# The drift gauges of image and next-word services, which the text service the test
# scrapes does not export: one per per-item drift feature (serving/monitoring/drift.py);
# their own service tests read them.
OTHER_TASKS = {f"textops_drift_{name}_psi" for name in ITEM_FEATURES}
SELECTOR = 'job=~"$job", instance=~"$instance"'
# PromQL words that look like metric names: operators and the modifiers whose label
# lists are cut out before names are read.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right"}
LABEL_LISTS = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
NAME = r"(?<![\w:.$])[a-zA-Z_:][\w:]*"


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects, as written: a classic histogram's
    series keep their _bucket, _sum or _count (a query for the bare name finds none),
    so they are compared with the names of the samples a scrape holds, not of the
    families. Strings (label values, regexes), label matchers, windows and label lists
    are cut out first; a name followed by `(` is a function or an aggregation."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(LABEL_LISTS, " ", expr)
    return {m.group() for m in re.finditer(NAME, expr)
            if m.group() not in KEYWORDS and not expr[m.end():].lstrip().startswith("(")}


def queries(board: dict) -> list[str]:
    """Every PromQL expression: each panel's targets, and the metric selector inside
    each `label_values(selector, label)` variable."""
    found = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            selector = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["definition"])
            found.append(selector.group(1))
    return found


def committed() -> dict:
    """The dashboard users import."""
    return json.loads(dashboard.OUTPUT.read_text())


def exported_names(url: str) -> set[str]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def exported(built_bundle, tmp_path_factory) -> set[str]:
    """The sample names a real service exports (two server processes, as the manifests
    run it) once it has done everything its metrics count: a reload, predictions,
    feedback, and a burst that overflows a one-text queue."""
    bundle_dir, _ = built_bundle
    with running_service(bundle_dir, tmp_path_factory.mktemp("dashboard"), workers=2,
                         admin_token="secret", max_queue=1, max_texts=1,
                         drift_window=10) as service:
        url = service.url
        reload = httpx.post(f"{url}/admin/reload", timeout=60,
                            headers={"Authorization": "Bearer secret"})
        assert reload.status_code == 200, reload.text
        ids = []
        for text in ["great superb film", "awful dull boring plot", "a film"] * 4:
            answer = httpx.post(f"{url}/predict", json={"texts": [text]}, timeout=30)
            assert answer.status_code == 200, answer.text
            ids.append(answer.json()["request_id"])
        for request_id, label in zip(ids, ["pos", "neg", "neg"] * 4, strict=True):
            taken = httpx.post(f"{url}/feedback", timeout=30,
                               json={"request_id": request_id, "label": label})
            assert taken.status_code == 200, taken.text

        def overflowed() -> bool:
            burst = [send_without_reading(url, "/explain", {"text": "superb film " * 20})
                     for _ in range(32)]
            return any(status == 503 for status, _, _ in answers(burst))

        eventually(overflowed, timeout=60, interval=0)
        # drift and live quality are computed per process at scrape time; the sibling
        # of the process that took the feedback reads the log a moment later
        wanted = {"textops_live_accuracy", "textops_drift_length_psi",
                  "textops_rejected_total", "textops_reloads_total"}
        return eventually(lambda: (names := exported_names(url)) >= wanted and names)


def test_every_metric_a_panel_queries_is_exported(exported):
    board = committed()
    queried = set().union(*map(metric_names, queries(board)))
    assert len(queried) >= 20  # the parse found the panels' metrics at all
    missing = sorted(queried - exported - SCRAPE_SERIES - OTHER_TASKS)
    assert not missing, f"panels query metrics the service does not export: {missing}"


def test_every_query_follows_the_chosen_job_and_replicas():
    board = committed()
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name in metric_names(expr):
                for found in re.finditer(rf"(?<![\w:]){re.escape(name)}(?![\w:])", expr):
                    assert expr[found.end():].startswith("{" + SELECTOR), \
                        f"{panel['title']}: {name} is not narrowed to $job and $instance"
            assert target["datasource"] == panel["datasource"] == {
                "type": "prometheus", "uid": "${datasource}"}
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    # the job the rules select is the one shown first
    assert variables["job"]["current"]["value"] == "textops"


def test_the_metric_name_parse():
    expr = ('histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{job=~"$job", '
            'x="sum(b)"}[$__rate_interval]))) / on (job) group_left (pod) c offset 5m '
            '> bool 1e3 and ignoring (d) e:rule')
    assert metric_names(expr) == {"a_bucket", "c", "e:rule"}


def test_the_committed_json_is_what_the_script_writes():
    assert dashboard.OUTPUT.read_text() == dashboard.rendered(), \
        "run python ops/grafana/dashboard.py"
    assert dashboard.main(["--check"]) == 0
    ids = [p["id"] for p in committed()["panels"]]
    assert ids == sorted(set(ids))


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")
def test_prometheus_parses_every_query(tmp_path):
    """Each query as a recording rule, with Grafana's variables given values:
    `promtool check rules` parses them with Prometheus's own parser."""
    values = {"$__rate_interval": "1m", "$job": "textops", "$instance": ".*"}
    rules = []
    for number, expr in enumerate(queries(committed())):
        for variable, value in values.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
