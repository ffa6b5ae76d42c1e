"""The Kubernetes and KServe manifests in ops/k8s/, checked offline as `make manifests` checks
them: every one validates, a broken field fails the check, and they agree with the
code they run (probe routes, the image's port and user, the service's settings)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, compose
from manifest_edits import copy_k8s, edit_field

sys.path.insert(0, str(ROOT / "ops" / "k8s"))
import agreement  # noqa: E402  (ops/k8s/agreement.py: the manifests against the code)
import manifests  # noqa: E402  (ops/k8s/manifests.py: the checks `make manifests` runs)

from serving.settings import Settings  # noqa: E402

BASE, CHAMPION = ROOT / "ops/k8s/base", ROOT / "ops/k8s/overlays/champion"
SECURE = ROOT / "ops/k8s/overlays/secure"
SERVERLESS, RAW = ROOT / "ops/k8s/kserve/serverless", ROOT / "ops/k8s/kserve/raw"
MONITORING, RETRAIN = ROOT / "ops/k8s/monitoring", ROOT / "ops/k8s/retrain"
SECURE_RETRAIN = ROOT / "ops/k8s/overlays/secure-retrain"
EVERY = [BASE, CHAMPION, SECURE, SERVERLESS, RAW, MONITORING, RETRAIN, SECURE_RETRAIN]
# What each kustomization holds.
KINDS = {BASE: {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"},
         SERVERLESS: {"InferenceService"}, MONITORING: {"ServiceMonitor"},
         RETRAIN: {"CronJob", "PersistentVolumeClaim"}}
KINDS.update({CHAMPION: KINDS[BASE], SECURE: KINDS[BASE], RAW: KINDS[SERVERLESS],
              SECURE_RETRAIN: KINDS[RETRAIN]})
KUBECTL = shutil.which("kubectl")


def rendered(directory: Path) -> dict[str, dict]:
    return {obj["kind"]: obj for obj in manifests.render(directory)}


def container(obj: dict) -> dict:
    (only,) = agreement.pod_spec(obj)["containers"]
    return only


def env(obj: dict) -> dict[str, str | dict]:
    """Each variable's value, or where it comes from (`valueFrom`)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(obj)["env"]}


FROM_SECRET = {"secretKeyRef": {"name": "textops-prediction-log", "key": "url"}}


# ---------------------------------------------------------------- every manifest validates


def test_every_kustomization_is_checked():
    # ops/k8s/shared is a component: the others include it, nobody applies it alone
    assert set(manifests.kustomizations()) == set(EVERY)


@pytest.mark.parametrize("directory", EVERY, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_manifest_validates(directory):
    lines = manifests.check(directory)
    assert {line.split()[2].split("/")[0] for line in lines} == KINDS[directory]
    assert all("kubernetes-validate (Kubernetes 1.32.0, strict)" in line
               or "check-jsonschema" in line for line in lines)


@pytest.mark.slow  # the KServe schema checked against its metaschema, and every manifest
def test_make_manifests_passes():
    result = subprocess.run(["make", "-o", f"{sys.prefix}/.installed", f"VENV={sys.prefix}",
                             "manifests"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok  ops/k8s/") == sum(len(KINDS[d]) for d in EVERY)


# ---------------------------------------------------------------- a broken field fails


BREAKAGES = {
    "a string replica count": (
        "base/deployment.yaml", "spec.replicas", "2",
        "spec.replicas: '2' is not of type 'integer'"),
    "a misspelt probe field": (
        "base/deployment.yaml", "spec.template.spec.containers.0.readinessprobe", {},
        "'readinessprobe' was unexpected"),
    "a string Service port": (
        "base/service.yaml", "spec.ports.0.port", "80", "'80' is not of type 'integer'"),
    "an unknown HPA metric field": (
        "base/hpa.yaml", "spec.metrics.0.resource.target.averageUtilisation", 70,
        "'averageUtilisation' was unexpected"),
    "protocolVersion under spec.predictor": (
        "kserve/serverless/inferenceservice.yaml", "spec.predictor.protocolVersion", "v2",
        "'protocolVersion' was unexpected"),
    "an unknown field in the predictor": (
        "kserve/serverless/inferenceservice.yaml", "spec.predictor.replicas", 2,
        "'replicas' was unexpected"),
    "a string container port in the InferenceService": (
        "kserve/serverless/inferenceservice.yaml",
        "spec.predictor.containers.0.ports.0.containerPort", "8000",
        "'8000' is not of type 'integer'"),
    # ... and what the schemas accept but the service would not honour
    "a readiness path the service does not have": (
        "base/deployment.yaml", "spec.template.spec.containers.0.readinessProbe.httpGet.path",
        "/v2/health/readiness", "readinessProbe GET /v2/health/readiness answers 404"),
    "liveness on the readiness route (a loading pod would be killed)": (
        "kserve/serverless/inferenceservice.yaml",
        "spec.predictor.containers.0.livenessProbe.httpGet.path", "/v2/health/ready",
        "livenessProbe GET /v2/health/ready answers 503 while the bundle loads"),
    "a container port that is not the image's": (
        "base/deployment.yaml", "spec.template.spec.containers.0.ports.0.containerPort", 8080,
        "containerPort 8080, the image listens on TEXTOPS_PORT=8000"),
    "a setting the service does not have": (
        "overlays/champion/follow-champion.yaml", "spec.template.spec.containers.0.env.2.name",
        "TEXTOPS_WATCH_INTERVAL", "TEXTOPS_WATCH_INTERVAL is not a setting"),
    # it would add a second, bare container; textops would not get the model to follow
    "a patch aimed at a misspelt container": (
        "overlays/champion/follow-champion.yaml", "spec.template.spec.containers.0.name",
        "textop", "unable to find field 'spec.template.spec.containers.[name=textops].env"),
    "TLS on, probes still on plain HTTP (every probe would fail)": (
        "components/tls/https.yaml", "spec.template.spec.containers.0.livenessProbe",
        {"httpGet": {"scheme": "HTTP"}},
        "livenessProbe scheme HTTP, the service serves HTTPS (TEXTOPS_TLS_CERT_FILE)"),
    "a public key outside every mounted volume (the service would not start)": (
        "components/signed-bundles/bundle-key.yaml",
        "spec.template.spec.containers.0.env.0.value", "/etc/textops/bundle-signing.pub",
        "TEXTOPS_BUNDLE_PUBLIC_KEY=/etc/textops/bundle-signing.pub is in no volume"),
    "the log's key file outside every mounted volume (the service would not start)": (
        "components/log-encryption/replicas.yaml",
        "spec.template.spec.containers.0.env.0.value", "/etc/textops/keys",
        "TEXTOPS_PREDICTION_LOG_KEY_FILE=/etc/textops/keys is in no volume"),
    "another user than the image's": (
        "kserve/serverless/inferenceservice.yaml",
        "spec.predictor.containers.0.securityContext.runAsUser", 1000,
        "runAsUser 1000, the image's user is 10001"),
    "no user in the pod or its container": (
        "base/deployment.yaml", "spec.template.spec.securityContext.runAsUser", None,
        "runAsUser None, the image's user is 10001"),
    "a misspelt ServiceMonitor field": (
        "monitoring/servicemonitor.yaml", "spec.endpoints.0.intervall", "15s",
        "'intervall' was unexpected"),
    "a misspelt CronJob field": (
        "retrain/cronjob.yaml", "spec.concurrencypolicy", "Forbid",
        "'concurrencypolicy' was unexpected"),
}


@pytest.fixture
def k8s_copy(tmp_path) -> Path:
    return copy_k8s(tmp_path)


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_field_fails_the_check(k8s_copy, breakage):
    file, path, value, message = BREAKAGES[breakage]
    directory = edit_field(k8s_copy, file, path, value)
    if directory.parent.name == "components":  # checked where it is used
        directory = k8s_copy / "overlays/secure"
    with pytest.raises(manifests.ManifestError) as failure:
        manifests.check(directory)
    assert message in str(failure.value)


def test_the_command_fails_on_a_broken_manifest_and_names_it(k8s_copy, capsys):
    edit_field(k8s_copy, "kserve/serverless/inferenceservice.yaml",
                "spec.predictor.protocolVersion", "v2")
    directories = [k8s_copy / d for d in ("base", "kserve/serverless", "kserve/raw")]
    assert manifests.main([str(d) for d in directories]) == 1
    out, err = capsys.readouterr()
    # the raw variant builds on the serverless one: both fail, naming the field
    assert err.count("'protocolVersion' was unexpected") == 2
    assert f"FAILED {k8s_copy / 'kserve/raw'}" in err
    assert f"ok  {k8s_copy / 'base'}  Deployment/textops" in out


# ---------------------------------------------------------------- the renderer


def test_the_champion_overlay_adds_to_the_base_container():
    base, overlay = rendered(BASE)["Deployment"], rendered(CHAMPION)["Deployment"]
    assert env(overlay) == {**env(base), "TEXTOPS_BUNDLE": "models:/sst2-classifier@champion",
                            "MLFLOW_TRACKING_URI": "http://mlflow.mlops.svc.cluster.local:5000",
                            "TEXTOPS_WATCH_INTERVAL_S": "10",
                            "TEXTOPS_PREDICTION_LOG": FROM_SECRET}
    # the base's "" (no log) is gone, not left beside the secret (an invalid variable)
    (log,) = [e for e in container(overlay)["env"] if e["name"] == "TEXTOPS_PREDICTION_LOG"]
    assert "value" not in log
    unchanged = {k: v for k, v in container(overlay).items() if k != "env"}
    assert unchanged == {k: v for k, v in container(base).items() if k != "env"}
    assert rendered(CHAMPION)["Service"] == rendered(BASE)["Service"]


def test_the_raw_inference_service_is_the_serverless_one_plus_raw_mode():
    serverless, raw = rendered(SERVERLESS)["InferenceService"], rendered(RAW)["InferenceService"]
    assert "annotations" not in serverless["metadata"]
    assert raw["metadata"]["annotations"] == {"serving.kserve.io/deploymentMode": "RawDeployment"}
    assert (raw["spec"]["predictor"]["scaleMetric"], raw["spec"]["predictor"]["scaleTarget"]) \
        == ("cpu", 70)
    # Knative's queue-proxy drains a serverless pod and Knative sets its grace period;
    # a raw one waits in preStop, then has the service's drain before SIGKILL
    assert "lifecycle" not in container(serverless)
    assert "terminationGracePeriodSeconds" not in serverless["spec"]["predictor"]
    assert container(raw)["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}
    drain = 3 * Settings().request_timeout_s
    assert raw["spec"]["predictor"]["terminationGracePeriodSeconds"] > 5 + drain
    assert {k: v for k, v in container(raw).items() if k != "lifecycle"} == container(serverless)


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its kustomize) is not installed")
@pytest.mark.parametrize("directory", EVERY, ids=lambda d: str(d.relative_to(ROOT)))
def test_the_renderer_agrees_with_kubectl_kustomize(directory):
    assert manifests.disagreement(manifests.render(directory),
                                  manifests.kubectl_render(directory)) is None


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its kustomize) is not installed")
def test_a_renderer_that_drifts_from_kubectl_fails_the_check(monkeypatch):
    real_render = manifests.render

    def drops_a_patch(directory):
        objects = real_render(BASE)  # the overlay without its patch
        return objects if directory == CHAMPION else real_render(directory)

    monkeypatch.setattr(manifests, "render", drops_a_patch)
    with pytest.raises(manifests.ManifestError, match="this renderer and kubectl kustomize "
                                                      "disagree: Deployment/textops differs"):
        manifests.check(CHAMPION)


def test_the_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [deployment.yaml]\nnamePrefix: staging-\n")
    with pytest.raises(manifests.ManifestError, match="namePrefix is not supported"):
        manifests.render(tmp_path)


# ---------------------------------------------------------------- what a cluster needs


def test_the_deployment_rolls_and_drains_without_losing_a_request():
    objects = rendered(CHAMPION)
    deployment, pod = objects["Deployment"], objects["Deployment"]["spec"]["template"]
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    probes = container(deployment)
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # a registry download
    assert probes["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    # SIGKILL comes after preStop and the service's own drain (3 x the request timeout)
    pre_stop = probes["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = 3 * Settings().request_timeout_s
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + drain
    for bound in ("requests", "limits"):
        assert set(probes["resources"][bound]) == {"cpu", "memory"}
    # onnxruntime would size its pool by the node's cores, not the pod's limit
    cpu_limit = int(probes["resources"]["limits"]["cpu"])
    # one server process per core of the limit, one model thread each: no more
    # threads than the pod may run
    variables = env(deployment)
    assert int(variables["TEXTOPS_WORKERS"]) * int(variables["TEXTOPS_INTRA_OP_THREADS"]) \
        == cpu_limit


@pytest.mark.parametrize("directory", [BASE, CHAMPION, SECURE, SERVERLESS, RAW],
                         ids=lambda d: str(d.relative_to(ROOT)))
def test_pods_run_unprivileged_and_write_only_to_empty_dirs(directory):
    (obj,) = [o for o in manifests.render(directory) if agreement.pod_spec(o)]
    spec, main, variables = agreement.pod_spec(obj), container(obj), env(obj)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert agreement.run_as_user(spec, main) == agreement.image_user() == 10001
    assert main["securityContext"].items() >= {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}.items()
    empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    writable = {m["mountPath"] for m in main["volumeMounts"] if m["name"] in empty_dirs}
    # what the service writes: registry bundles (TEXTOPS_CACHE_DIR), temporary files
    assert variables["TEXTOPS_CACHE_DIR"] in writable and "/tmp" in writable
    # ... and its prediction log (by default a SQLite file under the working directory,
    # on the read-only root): off, or one PostgreSQL database for every replica
    assert variables["TEXTOPS_PREDICTION_LOG"] == ("" if directory == BASE else FROM_SECRET)
    # ... and what it only reads is mounted read-only (the secure overlay's certificate
    # and public key)
    read_only = {v["name"] for v in spec["volumes"] if "secret" in v or "configMap" in v}
    assert all(m.get("readOnly") for m in main["volumeMounts"] if m["name"] in read_only)


@pytest.mark.parametrize("directory", [CHAMPION, SECURE, SERVERLESS, RAW],
                         ids=lambda d: str(d.relative_to(ROOT)))
def test_replicas_follow_the_champion_of_the_deployed_model(directory):
    (obj,) = [o for o in manifests.render(directory) if agreement.pod_spec(o)]
    model_name = compose().deploy.model_name
    assert env(obj)["TEXTOPS_BUNDLE"] == f"models:/{model_name}@champion"
    assert env(obj)["MLFLOW_TRACKING_URI"].startswith("http")
    assert float(env(obj)["TEXTOPS_WATCH_INTERVAL_S"]) > 0  # 0 would not follow it


def test_service_hpa_and_budget_select_the_pods():
    objects = rendered(BASE)
    deployment = objects["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        selector = objects[kind]["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), kind
    port_names = {p["name"] for p in container(deployment)["ports"]}
    assert objects["Service"]["spec"]["ports"][0]["targetPort"] in port_names
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["minReplicas"] == deployment["spec"]["replicas"] < hpa["maxReplicas"]
    assert objects["PodDisruptionBudget"]["spec"]["maxUnavailable"] < hpa["minReplicas"]


def test_the_secure_overlay_is_the_champion_over_https_verifying_bundles():
    """components/tls, components/signed-bundles and components/log-encryption over
    overlays/champion: HTTPS only (the Secret textops-tls, every probe over HTTPS, the
    Service on 443), the bundles' public key from the ConfigMap textops-bundle-key, and
    the prediction log's keys from the Secret textops-prediction-log-keys, required."""
    champion, secure = rendered(CHAMPION), rendered(SECURE)
    deployment = secure["Deployment"]
    pod, main = deployment["spec"]["template"]["spec"], container(deployment)
    variables = env(deployment)
    assert variables == {**env(champion["Deployment"]),
                         "TEXTOPS_TLS_CERT_FILE": "/etc/textops/tls/tls.crt",
                         "TEXTOPS_TLS_KEY_FILE": "/etc/textops/tls/tls.key",
                         "TEXTOPS_REQUIRE_TLS": "true",
                         "TEXTOPS_BUNDLE_PUBLIC_KEY": "/etc/textops/bundle-key/bundle-signing.pub",
                         "TEXTOPS_PREDICTION_LOG_KEY_FILE": "/etc/textops/log-keys/keys",
                         "TEXTOPS_REQUIRE_LOG_ENCRYPTION": "true"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "textops-tls"
    assert volumes["bundle-key"]["configMap"]["name"] == "textops-bundle-key"
    assert volumes["log-keys"]["secret"]["secretName"] == "textops-prediction-log-keys"
    for probe in agreement.PROBES:
        assert main[probe]["httpGet"]["scheme"] == "HTTPS"
        assert {k: v for k, v in main[probe]["httpGet"].items() if k != "scheme"} \
            == container(champion["Deployment"])[probe]["httpGet"]
    assert deployment["spec"]["template"]["metadata"]["annotations"][
        "prometheus.io/scheme"] == "https"
    assert secure["Service"]["spec"]["ports"] == [
        {"name": "https", "port": 443, "targetPort": "http", "protocol": "TCP"}]
    # nothing else changes: the same pods, rollout and limits as the champion overlay
    same = ("env", "volumeMounts", *agreement.PROBES)
    assert {k: v for k, v in main.items() if k not in same} == \
        {k: v for k, v in container(champion["Deployment"]).items() if k not in same}
