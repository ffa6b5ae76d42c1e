"""Whether the manifests agree with the code they run: the service's own app answers
each probe's path as the probe needs while a bundle loads (startup and readiness 503,
liveness 200; a missing route answers 404), container and probe ports are the image's
TEXTOPS_PORT, pods run as the image's user, every TEXTOPS_* variable is a setting of
serving/settings.py, the probes speak HTTPS exactly when the service does
(TEXTOPS_TLS_CERT_FILE), and each file a setting names (a certificate, its key, the
bundles' public key, the prediction log's keys) lies in a volume mounted into the
container.
ops/k8s/manifests.py asks `disagreements_with_code` of every rendered object.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from kustomize import ManifestError, describe

ROOT = Path(__file__).resolve().parent.parent.parent  # ops/k8s/ -> the repository
# Variables the image reads that are not TEXTOPS_* settings.
OTHER_ENV = {"MLFLOW_TRACKING_URI", "PYTHONUNBUFFERED"}


def pod_spec(obj: dict) -> dict | None:
    """The pod template of a Deployment, or the predictor of an InferenceService."""
    if obj["kind"] == "Deployment":
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "InferenceService":
        return obj["spec"]["predictor"]
    return None


def image_port() -> int:
    """The TEXTOPS_PORT the Dockerfile's image sets."""
    found = re.search(r"\bTEXTOPS_PORT=(\d+)", (ROOT / "Dockerfile").read_text())
    if not found:
        raise ManifestError("Dockerfile: no TEXTOPS_PORT=<port> in an ENV line")
    return int(found.group(1))


def run_as_user(pod: dict, container: dict) -> int | None:
    """The user a container runs as: its own securityContext's, else the pod's."""
    own = container.get("securityContext", {}).get("runAsUser")
    return own if own is not None else pod.get("securityContext", {}).get("runAsUser")


def image_user() -> int:
    """The numeric USER the Dockerfile's image runs as."""
    found = re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    if not found:
        raise ManifestError("Dockerfile: no numeric USER line")
    return int(found.group(1))


@functools.cache
def answers_before_load(path: str) -> int:
    """The status the service answers GET `path` with while it has no bundle yet (as a
    pod that is still loading one): 404 when the service has no such route."""
    from fastapi.testclient import TestClient

    from serving.api.app import create_app
    from serving.settings import Settings

    client = TestClient(create_app(Settings(bundle="/nonexistent")))  # no lifespan: no load
    return client.get(path).status_code


def setting_names() -> set[str]:
    from serving.settings import ENV_PREFIX, Settings

    return {ENV_PREFIX + name.upper() for name in Settings.model_fields}


# Settings that name a file the service reads at start: absent, it refuses to start.
FILE_SETTINGS = ("TEXTOPS_TLS_CERT_FILE", "TEXTOPS_TLS_KEY_FILE", "TEXTOPS_BUNDLE_PUBLIC_KEY",
                 "TEXTOPS_PREDICTION_LOG_KEY_FILE")

# What each probe's path must answer while the bundle is still loading: the startup
# and readiness probes must wait for the load (503), liveness must not (200).
PROBES = {"startupProbe": 503, "readinessProbe": 503, "livenessProbe": 200}


def disagreements_with_code(obj: dict) -> list[str]:
    """What in a pod spec the image and the service would not honour."""
    spec = pod_spec(obj)
    if spec is None:
        return []
    problems = []
    for container in spec["containers"]:
        name = f"{describe(obj)} container {container['name']}"
        problems += [f"{name}: {problem}" for problem in
                     user_problems(spec, container) + port_problems(container)
                     + probe_problems(container) + env_problems(container)
                     + tls_problems(container) + file_problems(container)]
    return problems


def user_problems(pod: dict, container: dict) -> list[str]:
    user = run_as_user(pod, container)
    return [] if user == image_user() else [
        f"runAsUser {user}, the image's user is {image_user()}"]


def port_problems(container: dict) -> list[str]:
    port = image_port()
    return [f"containerPort {p['containerPort']}, the image listens on TEXTOPS_PORT={port}"
            for p in container.get("ports", []) if p["containerPort"] != port]


def probe_problems(container: dict) -> list[str]:
    port, problems = image_port(), []
    named_ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])
                   if "name" in p}
    for probe, wanted in PROBES.items():
        get = container.get(probe, {}).get("httpGet")
        if get is None:
            problems.append(f"no HTTP {probe}")
            continue
        if named_ports.get(get["port"], get["port"]) != port:
            problems.append(f"{probe} port {get['port']} is not {port}")
        status = answers_before_load(get["path"])
        if status != wanted:
            problems.append(f"{probe} GET {get['path']} answers {status} while the bundle "
                            f"loads; it should answer {wanted}")
    return problems


def env_problems(container: dict) -> list[str]:
    port, settings, problems = image_port(), setting_names(), []
    for variable in container.get("env", []):
        name, value = variable["name"], variable.get("value")
        if name == "TEXTOPS_PORT" and value != str(port):
            problems.append(f"TEXTOPS_PORT={value}, the container port is {port}")
        if name not in settings and name not in OTHER_ENV:
            problems.append(f"{name} is not a setting of serving/settings.py")
    return problems


def literal_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if e.get("value")}


def tls_problems(container: dict) -> list[str]:
    """The kubelet's probes must speak what the service speaks: HTTP to an HTTPS port
    fails the handshake (every probe fails), HTTPS to an HTTP port too."""
    https = bool(literal_env(container).get("TEXTOPS_TLS_CERT_FILE"))
    problems = []
    for probe in PROBES:
        get = container.get(probe, {}).get("httpGet")
        scheme = (get or {}).get("scheme", "HTTP")
        if get is not None and (scheme == "HTTPS") != https:
            problems.append(f"{probe} scheme {scheme}, the service serves "
                            f"{'HTTPS (TEXTOPS_TLS_CERT_FILE)' if https else 'plain HTTP'}")
    return problems


def file_problems(container: dict) -> list[str]:
    mounts = [m["mountPath"].rstrip("/") + "/" for m in container.get("volumeMounts", [])]
    return [f"{name}={path} is in no volume mounted into the container"
            for name, path in literal_env(container).items()
            if name in FILE_SETTINGS and not any(path.startswith(m) for m in mounts)]
