"""Offline checks of the Kubernetes and KServe manifests: `python ops/k8s/manifests.py`
(`make manifests`). No cluster is needed.

1. Render each kustomization (ops/k8s/base, overlays/*, kserve/*, monitoring, retrain)
   with a small renderer for the part of kustomize these directories use (see
   ops/k8s/kustomize.py). Anything else in a kustomization.yaml is refused, not
   ignored. Where `kubectl` is installed, its own `kubectl kustomize` renders each
   directory too and the two must agree, so the renderer cannot drift from the real
   tool unnoticed.
2. Validate every core object with `kubernetes-validate` against the schemas of
   Kubernetes KUBERNETES_VERSION, strictly (an unknown field is an error), and every
   custom resource (KServe's InferenceService, the Prometheus operator's
   ServiceMonitor) with `check-jsonschema` against its CRD's schema in ops/k8s/schemas/
   (see ops/k8s/schemas/SOURCE.md).
3. Check that the manifests agree with the code: the service's own app answers each
   probe's path as the probe needs while a bundle loads (startup and readiness 503,
   liveness 200; a missing route answers 404), container and probe ports are the
   image's TEXTOPS_PORT, pods run as the image's user, every TEXTOPS_* variable is a
   setting of serving/settings.py, probes speak HTTPS exactly when the service does, and
   the files settings name (certificate, key, public key, the log's keys) are in
   mounted volumes.

Rendering is ops/k8s/kustomize.py, the agreement with the code ops/k8s/agreement.py;
validation and the command are here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from agreement import disagreements_with_code
from kustomize import (
    K8S_DIR,
    ManifestError,
    describe,
    disagreement,
    kubectl_render,
    kustomizations,
    render,
)

ROOT = K8S_DIR.parent.parent  # ops/k8s/ -> the repository
KUBERNETES_VERSION = "1.32.0"
# The custom resources the manifests use, each with its CRD's JSON schema.
CUSTOM_SCHEMAS = {
    ("serving.kserve.io/v1beta1", "InferenceService"):
        K8S_DIR / "schemas" / "inferenceservice_v1beta1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"):
        K8S_DIR / "schemas" / "servicemonitor_v1.json",
}


# ---------------------------------------------------------------- validation


def validate(obj: dict, where: str) -> str:
    """Validate one object; returns what checked it, raises ManifestError."""
    schema = CUSTOM_SCHEMAS.get((obj.get("apiVersion"), obj.get("kind")))
    if schema is not None:
        validate_custom(obj, schema, where)
        return f"check-jsonschema ({schema.name})"
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


def validate_custom(obj: dict, schema: Path, where: str) -> None:
    # The validator class named: check-jsonschema then skips checking the schema (KServe's
    # is 1.4 MB) against its metaschema on every call (2 to 4 s); check_schemas() does that.
    with tempfile.TemporaryDirectory() as tmp:
        document = Path(tmp) / "object.json"
        document.write_text(json.dumps(obj))
        result = check_jsonschema("--validator-class", "jsonschema:Draft202012Validator",
                                  "--schemafile", str(schema), str(document))
    if result.returncode != 0:
        problems = (result.stdout + result.stderr).replace(str(document), describe(obj))
        raise ManifestError(f"{where}: {problems.strip()}")


def check_schemas() -> None:
    """Each custom resource's schema is itself a valid JSON schema."""
    for schema in CUSTOM_SCHEMAS.values():
        result = check_jsonschema("--check-metaschema", str(schema))
        if result.returncode != 0:
            raise ManifestError(f"{schema}: {(result.stdout + result.stderr).strip()}")


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
    custom resources' schemas themselves."""
    directories = [Path(a).resolve() for a in argv] or kustomizations()
    failed = False
    if not argv:
        try:
            check_schemas()
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
