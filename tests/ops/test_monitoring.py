"""Prometheus finds the service under the job its alerting rules select: the plain
configuration (ops/prometheus/prometheus.yml) and the Prometheus operator's
ServiceMonitor (ops/k8s/monitoring/) both scrape it as the job that every rule in
ops/prometheus/alerts.yml names, and promtool accepts the configuration."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT
from manifest_edits import copy_k8s, edit_field

sys.path.insert(0, str(ROOT / "ops" / "k8s"))
import kustomize  # noqa: E402  (ops/k8s/kustomize.py: the renderer)

PROMETHEUS = ROOT / "ops" / "prometheus"
PROMTOOL = shutil.which("promtool")


def jobs_the_rules_select() -> set[str]:
    """Every job="..." matcher in the rules and in their tests' input series."""
    text = (PROMETHEUS / "alerts.yml").read_text() + (PROMETHEUS / "alerts_test.yml").read_text()
    return set(re.findall(r'\bjob\s*=\s*\\?"([^"\\]+)', text))


def scraped_jobs() -> set[str]:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    return {job["job_name"] for job in config["scrape_configs"]}


def service_monitor_job(k8s) -> str:
    """The job label the Prometheus operator gives what the ServiceMonitor scrapes: the
    value of the Service's `jobLabel` label, else the Service's name. Exactly one
    Service of the serving manifests must match its selector, on a port it names."""
    (monitor,) = kustomize.render(k8s / "monitoring")
    services = [o for o in kustomize.render(k8s / "overlays" / "champion")
                if o["kind"] == "Service"]
    wanted = monitor["spec"]["selector"]["matchLabels"]
    (service,) = [s for s in services if wanted.items() <= s["metadata"]["labels"].items()]
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    assert {e.get("path", "/metrics") for e in monitor["spec"]["endpoints"]} == {"/metrics"}
    labels = service["metadata"]["labels"]
    return labels.get(monitor["spec"].get("jobLabel", ""), service["metadata"]["name"])


def test_the_rules_the_scrape_and_the_service_monitor_name_one_job():
    rule_jobs = jobs_the_rules_select()
    assert rule_jobs == {"textops"}
    assert scraped_jobs() == rule_jobs
    assert service_monitor_job(ROOT / "ops" / "k8s") == "textops"


def test_a_service_monitor_that_names_its_job_otherwise_is_noticed(tmp_path):
    k8s = copy_k8s(tmp_path)
    edit_field(k8s, "monitoring/servicemonitor.yaml", "spec.jobLabel",
               "app.kubernetes.io/component")
    assert service_monitor_job(k8s) == "serving"  # the rules would never fire


def test_the_plain_configuration_loads_the_rules():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]  # relative to the configuration
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")
def test_promtool_accepts_the_configuration_and_its_rules():
    result = subprocess.run([PROMTOOL, "check", "config", "prometheus.yml"],
                            cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "SUCCESS: 1 rule files found" in output


def test_the_pod_annotations_point_at_the_metrics():
    """For a Prometheus that finds pods by their prometheus.io annotations."""
    (deployment,) = [o for o in kustomize.render(ROOT / "ops" / "k8s" / "base")
                     if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    (container,) = pod["spec"]["containers"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == container["ports"][0]["containerPort"]
