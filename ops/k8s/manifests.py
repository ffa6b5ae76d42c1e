"""Offline checks of the Kubernetes and KServe manifests: `python ops/k8s/manifests.py`
(`make manifests`). No cluster is needed.

1. Render each kustomization (ops/k8s/base, ops/k8s/overlays/*, ops/k8s/kserve/*) with a small
   renderer for the part of kustomize these directories use: `resources` (files and
   directories) and `patches` (strategic-merge patch files, inline JSON 6902 patches).
   Anything else in a kustomization.yaml is refused, not ignored. Where `kubectl` is
   installed, its own `kubectl kustomize` renders each directory too and the two must
   agree, so the renderer cannot drift from the real tool unnoticed.
2. Validate every core object with `kubernetes-validate` against the schemas of
   Kubernetes KUBERNETES_VERSION, strictly (an unknown field is an error), and every
   KServe InferenceService with `check-jsonschema` against ops/k8s/schemas/ (KServe's CRD
   schema, see ops/k8s/schemas/SOURCE.md).
3. Check that the manifests agree with the code: the service's own app answers each
   probe's path as the probe needs while a bundle loads (startup and readiness 503,
   liveness 200; a missing route answers 404), container and probe ports are the
   image's TEXTOPS_PORT, pods run as the image's user, every TEXTOPS_* variable is a
   setting of serving/settings.py.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

K8S_DIR = Path(__file__).resolve().parent
ROOT = K8S_DIR.parent
KUBERNETES_VERSION = "1.32.0"
KSERVE_SCHEMA = K8S_DIR / "schemas" / "inferenceservice_v1beta1.json"
KSERVE_API = "serving.kserve.io/v1beta1"
# Variables the image reads that are not TEXTOPS_* settings.
OTHER_ENV = {"MLFLOW_TRACKING_URI", "PYTHONUNBUFFERED"}

# Strategic merge: the field names whose lists Kubernetes merges item by item, and the
# key that matches items (from the Kubernetes API's patchMergeKey annotations). Every
# other list is replaced whole, as it is in custom resources.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name",
              "volumes": "name", "volumeMounts": "mountPath", "imagePullSecrets": "name"}
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches"}


class ManifestError(Exception):
    """A manifest that does not render, validate or agree with the code."""


# ---------------------------------------------------------------- rendering


def kustomizations() -> list[Path]:
    """Every directory a user applies with `kubectl apply -k`."""
    return sorted(p.parent for p in K8S_DIR.rglob("kustomization.yaml"))


def render(directory: Path) -> list[dict]:
    """The objects `kubectl kustomize directory` prints, in file order."""
    path = directory / "kustomization.yaml"
    spec = yaml.safe_load(path.read_text())
    unknown = set(spec) - KUSTOMIZATION_FIELDS
    if unknown:
        raise ManifestError(f"{path}: {', '.join(sorted(unknown))} is not supported by "
                            f"this renderer (only {', '.join(sorted(KUSTOMIZATION_FIELDS))})")
    objects = []
    for entry in spec.get("resources", []):
        source = directory / entry
        objects += render(source) if source.is_dir() else load_documents(source)
    for patch in spec.get("patches", []):
        apply_patch(objects, patch, directory, path)
    return objects


def load_documents(path: Path) -> list[dict]:
    try:
        return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except (OSError, yaml.YAMLError) as err:
        raise ManifestError(f"{path}: {err}") from None


def apply_patch(objects: list[dict], patch: dict, directory: Path, origin: Path) -> None:
    if "path" in patch:
        body = load_documents(directory / patch["path"])
        if len(body) != 1:
            raise ManifestError(f"{directory / patch['path']}: one patch per file")
        body = body[0]
    else:
        body = yaml.safe_load(patch["patch"])
    if isinstance(body, list):  # JSON 6902: a list of operations on the target
        target = find(objects, patch.get("target", {}), origin)
        for operation in body:
            json_patch(target, operation, origin)
    else:  # strategic merge, aimed by its own kind and name
        aim = {"kind": body["kind"], "name": body["metadata"]["name"]}
        target = find(objects, {**aim, **patch.get("target", {})}, origin)
        merged = strategic_merge(target, body, custom=is_custom(target))
        target.clear()
        target.update(merged)


def find(objects: list[dict], target: dict, origin: Path) -> dict:
    matches = [o for o in objects if o["kind"] == target.get("kind", o["kind"])
               and o["metadata"]["name"] == target.get("name", o["metadata"]["name"])]
    if len(matches) != 1:
        raise ManifestError(f"{origin}: patch target {target} matches {len(matches)} objects")
    return matches[0]


def is_custom(obj: dict) -> bool:
    """Custom resources (a dotted API group outside *.k8s.io) have no merge keys."""
    group = obj["apiVersion"].rpartition("/")[0]
    return "." in group and not group.endswith(".k8s.io")


def strategic_merge(base, patch, custom: bool, field: str = ""):
    """`patch` merged into a copy of `base`: maps key by key (null deletes a key), keyed
    lists item by item (the patch's items first, in its order, as kustomize orders
    them), other lists replaced."""
    if isinstance(patch, dict):
        base = base if isinstance(base, dict) else {}
        if any(key.startswith("$") for key in patch):
            raise ManifestError(f"patch directive in {field!r}: not supported")
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = strategic_merge(base.get(key), value, custom, key)
        return merged
    key = None if custom else MERGE_KEYS.get(field)
    if key and isinstance(patch, list) and isinstance(base, list):
        existing = {item[key]: item for item in base}
        named = {item[key] for item in patch}
        merged = [strategic_merge(existing[item[key]], item, custom, field)
                  if item[key] in existing else strategic_merge(None, item, custom, field)
                  for item in patch]
        return merged + [copy.deepcopy(item) for item in base if item[key] not in named]
    return copy.deepcopy(patch)


def json_patch(obj: dict, operation: dict, origin: Path) -> None:
    """One RFC 6902 `add`, `replace` or `remove` on `obj`, in place."""
    op, pointer = operation["op"], operation["path"]
    *parents, last = [part.replace("~1", "/").replace("~0", "~")
                      for part in pointer.lstrip("/").split("/")]
    node = obj
    try:
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if op == "add":
                node.insert(index, operation["value"])
            elif op == "replace":
                node[index] = operation["value"]
            elif op == "remove":
                del node[index]
            else:
                raise ManifestError(f"{origin}: JSON patch op {op!r} is not supported")
        elif op in ("add", "replace"):
            if op == "replace" and last not in node:
                raise KeyError(last)
            node[last] = operation["value"]
        elif op == "remove":
            del node[last]
        else:
            raise ManifestError(f"{origin}: JSON patch op {op!r} is not supported")
    except (KeyError, IndexError, ValueError, TypeError):
        raise ManifestError(f"{origin}: JSON patch {op} {pointer}: no such path") from None


def kubectl_render(directory: Path) -> list[dict] | None:
    """`kubectl kustomize directory`, or None where kubectl is not installed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True,
                            text=True, timeout=60)
    if result.returncode != 0:
        raise ManifestError(f"kubectl kustomize {directory}: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def disagreement(ours: list[dict], theirs: list[dict]) -> str | None:
    """How two renderings differ (kubectl orders objects by kind), or None."""
    def by_name(objects):
        return {f"{o['kind']}/{o['metadata']['name']}": o for o in objects}

    mine, real = by_name(ours), by_name(theirs)
    if mine.keys() != real.keys():
        return f"objects {sorted(mine)} here, {sorted(real)} from kubectl"
    for name, obj in mine.items():
        if obj != real[name]:
            return (f"{name} differs:\n  here:    {json.dumps(obj, sort_keys=True)}\n"
                    f"  kubectl: {json.dumps(real[name], sort_keys=True)}")
    return None


# ---------------------------------------------------------------- validation


def validate(obj: dict, where: str) -> str:
    """Validate one object; returns what checked it, raises ManifestError."""
    if obj.get("apiVersion") == KSERVE_API and obj.get("kind") == "InferenceService":
        validate_inference_service(obj, where)
        return f"check-jsonschema ({KSERVE_SCHEMA.name})"
    import kubernetes_validate.utils as kv

    try:
        kv.validate(obj, KUBERNETES_VERSION, strict=True)
    except kv.ValidationError as err:
        path = ".".join(str(p) for p in err.path)
        raise ManifestError(f"{where}: {describe(obj)}: {path}: {err.message}") from None
    except kv.SchemaNotFoundError as err:
        raise ManifestError(f"{where}: {describe(obj)}: {err.message}") from None
    return f"kubernetes-validate (Kubernetes {KUBERNETES_VERSION}, strict)"


def check_jsonschema(*args: str) -> subprocess.CompletedProcess:
    tool = Path(sys.executable).parent / "check-jsonschema"
    return subprocess.run([str(tool), *args], capture_output=True, text=True, timeout=120)


def validate_inference_service(obj: dict, where: str) -> None:
    # The validator class named: check-jsonschema then skips checking the 1.4 MB schema
    # against its metaschema on every call (2 to 4 s); check_kserve_schema() does that.
    with tempfile.TemporaryDirectory() as tmp:
        document = Path(tmp) / "inferenceservice.json"
        document.write_text(json.dumps(obj))
        result = check_jsonschema("--validator-class", "jsonschema:Draft202012Validator",
                                  "--schemafile", str(KSERVE_SCHEMA), str(document))
    if result.returncode != 0:
        problems = (result.stdout + result.stderr).replace(str(document), describe(obj))
        raise ManifestError(f"{where}: {problems.strip()}")


def check_kserve_schema() -> None:
    """The KServe schema is itself a valid JSON schema."""
    result = check_jsonschema("--check-metaschema", str(KSERVE_SCHEMA))
    if result.returncode != 0:
        raise ManifestError(f"{KSERVE_SCHEMA}: {(result.stdout + result.stderr).strip()}")


def describe(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# ---------------------------------------------------------------- agreement with the code


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
                     + probe_problems(container) + env_problems(container)]
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


# ---------------------------------------------------------------- the command


def shown(directory: Path) -> str:
    return str(directory.relative_to(ROOT)) if directory.is_relative_to(ROOT) else str(directory)


def check(directory: Path) -> list[str]:
    """Render, compare with kubectl, validate and compare with the code; one line per
    object checked. Raises ManifestError with every problem found."""
    where = shown(directory)
    objects = render(directory)
    problems = []
    theirs = kubectl_render(directory)
    if theirs is not None and (differ := disagreement(objects, theirs)):
        problems.append(f"{where}: this renderer and kubectl kustomize disagree: {differ}")
    lines = []
    for obj in objects:
        try:
            lines.append(f"ok  {where}  {describe(obj)}  {validate(obj, where)}")
        except ManifestError as err:
            problems.append(str(err))
        problems += [f"{where}: {p}" for p in disagreements_with_code(obj)]
    if problems:
        raise ManifestError("\n".join(problems))
    return lines


def main(argv: list[str]) -> int:
    """`manifests.py [directory ...]`: check those kustomizations, or all of them and the
    KServe schema itself."""
    directories = [Path(a).resolve() for a in argv] or kustomizations()
    failed = False
    if not argv:
        try:
            check_kserve_schema()
        except ManifestError as err:
            print(f"FAILED {err}", file=sys.stderr)
            failed = True
    for directory in directories:
        try:
            print("\n".join(check(directory)))
        except ManifestError as err:
            print(f"FAILED {shown(directory)}\n{err}", file=sys.stderr)
            failed = True
    if shutil.which("kubectl") is None:
        print("(kubectl not installed: the renderer was not compared with kustomize)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
