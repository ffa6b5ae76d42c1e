"""The kustomize subset that ops/k8s/ uses, rendered without kustomize: `render`.

`resources` (files and directories), `components` (ops/k8s/shared: the names several
kustomizations share), `patches` (strategic-merge patch files, inline JSON 6902
patches; one with a `target` changes what that selects, which may be nothing),
`images` and `replacements` (ops/k8s/kustomize_transforms.py), and objects marked
`config.kubernetes.io/local-config` (replacement sources) left out of the output;
anything else in a kustomization.yaml is refused, not ignored. ops/k8s/manifests.py
renders every kustomization with it and, where `kubectl` is installed, compares the
result with `kubectl kustomize` (`kubectl_render`, `disagreement`), so this renderer
cannot drift from the real tool unnoticed.

Imported by its siblings as a top-level module (`python ops/k8s/manifests.py` puts
ops/k8s/ on sys.path).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import yaml
from kustomize_transforms import TransformError, apply_images, apply_replacements

K8S_DIR = Path(__file__).resolve().parent
# Strategic merge: the field names whose lists Kubernetes merges item by item, and the
# key that matches items (from the Kubernetes API's patchMergeKey annotations). Every
# other list is replaced whole, as it is in custom resources.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name",
              "volumes": "name", "volumeMounts": "mountPath", "imagePullSecrets": "name"}
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "components", "patches",
                        "images", "replacements"}
# Objects that only feed replacements: kustomize leaves them out of what it prints.
LOCAL_CONFIG = "config.kubernetes.io/local-config"


class ManifestError(Exception):
    """A manifest that does not render, validate or agree with the code."""


def describe(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def kustomizations() -> list[Path]:
    """Every directory a user applies with `kubectl apply -k` (not the components,
    which only other kustomizations include)."""
    return sorted(p.parent for p in K8S_DIR.rglob("kustomization.yaml")
                  if yaml.safe_load(p.read_text()).get("kind") != "Component")


def render(directory: Path) -> list[dict]:
    """The objects `kubectl kustomize directory` prints, in file order."""
    objects = accumulate(directory)
    names = [describe(o) for o in objects]
    if twice := sorted({name for name in names if names.count(name) > 1}):
        raise ManifestError(f"{directory}: {', '.join(twice)} more than once (a component "
                            f"included twice?)")
    return [o for o in objects
            if o.get("metadata", {}).get("annotations", {}).get(LOCAL_CONFIG) != "true"]


def accumulate(directory: Path, objects: list[dict] | None = None) -> list[dict]:
    """`directory` built as kustomize builds it: its resources, then its components
    (each adds its own and transforms everything so far), then its own patches, images
    and replacements, in that order. A component adds to its parent's `objects`."""
    path = directory / "kustomization.yaml"
    spec = yaml.safe_load(path.read_text())
    unknown = set(spec) - KUSTOMIZATION_FIELDS
    if unknown:
        raise ManifestError(f"{path}: {', '.join(sorted(unknown))} is not supported by "
                            f"this renderer (only {', '.join(sorted(KUSTOMIZATION_FIELDS))})")
    if (spec.get("kind") == "Component") != (objects is not None):
        raise ManifestError(f"{path}: a Component belongs under `components:`, anything "
                            f"else under `resources:`")
    objects = [] if objects is None else objects
    for entry in spec.get("resources", []):
        source = directory / entry
        objects += accumulate(source) if source.is_dir() else load_documents(source)
    for component in spec.get("components", []):
        accumulate(directory / component, objects)
    for patch in spec.get("patches", []):
        apply_patch(objects, patch, directory, path)
    try:
        apply_images(objects, spec.get("images", []), str(path))
        apply_replacements(objects, spec.get("replacements", []), str(path))
    except TransformError as err:
        raise ManifestError(str(err)) from None
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
    if "target" in patch:
        # As kustomize: a patch with a `target` changes whatever that selects, nothing
        # included. A component can thus patch the Deployment where there is one and
        # the CronJob where there is one (components/tls, components/log-encryption).
        targets = select(objects, patch["target"])
    elif isinstance(body, list):
        raise ManifestError(f"{origin}: a JSON 6902 patch needs a `target`")
    else:  # a strategic merge aimed by its own kind and name: exactly one object
        aim = {"kind": body["kind"], "name": body["metadata"]["name"]}
        targets = select(objects, aim)
        if len(targets) != 1:
            raise ManifestError(f"{origin}: patch target {aim} matches {len(targets)} "
                                "objects")
    for target in targets:
        if isinstance(body, list):  # JSON 6902: a list of operations on the target
            for operation in body:
                json_patch(target, operation, origin)
        else:
            merged = strategic_merge(target, body, custom=is_custom(target))
            target.clear()
            target.update(merged)


def select(objects: list[dict], target: dict) -> list[dict]:
    return [o for o in objects if o["kind"] == target.get("kind", o["kind"])
            and o["metadata"]["name"] == target.get("name", o["metadata"]["name"])]


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
