"""The retraining CronJob (ops/k8s/retrain/) runs the loop the repository has, against
the service and the prediction log the replicas use, one run at a time, and keeps the
loop's record between runs; its secure variant (ops/k8s/overlays/secure-retrain) reads
the secure replicas over HTTPS and decrypts their log."""

from __future__ import annotations

import re
import subprocess
import sys
from urllib.parse import urlsplit

import pytest
from conftest import ROOT

from pipeline.config import load_params

sys.path.insert(0, str(ROOT / "ops" / "k8s"))
import kustomize  # noqa: E402  (ops/k8s/kustomize.py: the renderer)

K8S = ROOT / "ops" / "k8s"


def by_kind(directory: str) -> dict[str, dict]:
    return {o["kind"]: o for o in kustomize.render(K8S / directory)}


@pytest.fixture(scope="module")
def job():
    """(the CronJob, its pod spec, its one container)."""
    cron = by_kind("retrain")["CronJob"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return cron, pod, container


def env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_it_runs_the_retraining_loop_with_arguments_the_loop_takes(job):
    _, _, container = job
    command = container["command"] + container["args"]
    assert command[:3] == ["python", "-m", "pipeline.loops.retrain"]
    assert not container["image"].startswith("textops-serving")  # no torch, no pipeline
    usage = subprocess.run([sys.executable, "-m", "pipeline.loops.retrain", "--help"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0, usage.stderr
    for flag in (part for part in command[3:] if part.startswith("--")):
        assert re.search(rf"{re.escape(flag)}(?![\w-])", usage.stdout), \
            f"{flag}: the loop has no such option"


def test_it_reads_the_service_and_the_log_the_replicas_use(job):
    _, _, container = job
    serving = by_kind("overlays/champion")
    url = urlsplit(container["args"][container["args"].index("--service-url") + 1])
    service = serving["Service"]
    assert url.hostname == service["metadata"]["name"]
    assert (url.port or 80) in {p["port"] for p in service["spec"]["ports"]}
    replicas = env(serving["Deployment"]["spec"]["template"]["spec"]["containers"][0])
    # the loop reads TEXTOPS_PREDICTION_LOG when --log is not given: the same secret,
    # never a password on the command line
    assert "--log" not in container["args"]
    assert env(container)["TEXTOPS_PREDICTION_LOG"] == replicas["TEXTOPS_PREDICTION_LOG"] \
        == {"secretKeyRef": {"name": "textops-prediction-log", "key": "url"}}
    assert env(container)["MLFLOW_TRACKING_URI"] == replicas["MLFLOW_TRACKING_URI"]


def test_one_run_at_a_time_within_bounds(job):
    cron, pod, container = job
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    run = cron["spec"]["jobTemplate"]["spec"]
    assert 0 <= run["backoffLimit"] <= 2 and run["activeDeadlineSeconds"] > 0
    assert pod["restartPolicy"] == "Never"
    resources = container["resources"]
    for bound in ("requests", "limits"):
        assert set(resources[bound]) == {"cpu", "memory"}
    # torch would start a thread per core of the node, not of the limit
    assert env(container)["OMP_NUM_THREADS"] == resources["limits"]["cpu"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_loops_record_outlives_the_pod(job):
    """Its `last_retraining` is where the next run counts new labels from."""
    _, pod, container = job
    record = f"{container['workingDir']}/{load_params(ROOT / 'params.yaml').retrain.record}"
    (mount,) = container["volumeMounts"]
    assert record.startswith(mount["mountPath"] + "/")
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claims = {o["metadata"]["name"] for o in kustomize.render(K8S / "retrain")
              if o["kind"] == "PersistentVolumeClaim"}
    assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_the_secure_variant_calls_https_trusting_the_certificate_and_has_the_log_keys():
    cron = by_kind("overlays/secure-retrain")["CronJob"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    serving = by_kind("overlays/secure")
    url = urlsplit(container["args"][container["args"].index("--service-url") + 1])
    # the secure Service answers HTTPS on 443 only
    assert url.scheme == "https" and url.hostname == serving["Service"]["metadata"]["name"]
    assert [p["port"] for p in serving["Service"]["spec"]["ports"]] == [url.port or 443]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    replicas = env(serving["Deployment"]["spec"]["template"]["spec"]["containers"][0])

    def secret_of(path: str) -> dict:
        """The Secret volume mounted read-only at the directory holding `path`."""
        mount = mounts[path.rsplit("/", 1)[0]]
        assert mount.get("readOnly") is True
        return volumes[mount["name"]]["secret"]

    # it trusts the certificate the replicas serve, and gets nothing else of its Secret
    trusted = secret_of(env(container)["SSL_CERT_FILE"])
    assert trusted["secretName"] == "textops-tls"
    assert trusted["items"] == [{"key": "tls.crt", "path": "tls.crt"}]
    assert env(container)["SSL_CERT_FILE"].endswith("/tls.crt")
    # the export decrypts with the replicas' own keys
    keys = env(container)["TEXTOPS_PREDICTION_LOG_KEY_FILE"]
    assert keys == replicas["TEXTOPS_PREDICTION_LOG_KEY_FILE"]
    assert secret_of(keys)["secretName"] == "textops-prediction-log-keys"
    # the rest is the plain CronJob's
    plain = by_kind("retrain")["CronJob"]
    assert cron["spec"]["schedule"] == plain["spec"]["schedule"]
