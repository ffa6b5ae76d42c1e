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
KSERVE_SCHEMA = K8S_DIR / "schemas" / "inferenceservice_v1beta1.json"
KSERVE_API = "serving.kserve.io/v1beta1"


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
