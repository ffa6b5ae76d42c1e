"""The two kustomize transformers that carry shared names into ops/k8s/'s manifests,
as kustomize v5 applies them: `images` (a new name, tag or digest for an image,
wherever a container uses it) and `replacements` (a field of one object copied into
fields of others). ops/k8s/kustomize.py runs them after a kustomization's patches.

Only what these directories use is implemented; anything else is refused, and a
replacement target that selects no object is an error here (kustomize would silently
do nothing: a misspelt name would leave the old value in place).
"""

from __future__ import annotations

import copy
import re

IMAGE_FIELDS = {"name", "newName", "newTag", "digest"}
REPLACEMENT_FIELDS = {"source", "targets"}
SOURCE_FIELDS = {"kind", "name", "fieldPath"}
TARGET_FIELDS = {"select", "fieldPaths"}
SELECT_FIELDS = {"kind", "name"}


class TransformError(Exception):
    """A transformer this subset cannot apply; kustomize.py reports it as a ManifestError."""


def refuse_unknown(spec: dict, allowed: set[str], what: str) -> None:
    unknown = set(spec) - allowed
    if unknown:
        raise TransformError(f"{what}: {', '.join(sorted(unknown))} is not supported by "
                             f"this renderer (only {', '.join(sorted(allowed))})")


# ---------------------------------------------------------------- images


def split_image(image: str) -> tuple[str, str, str]:
    """(name, tag, digest) of an image reference; a registry's port is not a tag."""
    image, _, digest = image.partition("@")
    name, colon, tag = image.rpartition(":")
    if not colon or "/" in tag:  # no tag, or the colon was a registry's port
        return image, "", digest
    return name, tag, digest


def new_image(image: str, entry: dict) -> str:
    """`image` as an `images:` entry rewrites it, or unchanged when it is another image.
    As kustomize: a new tag drops the digest and a new digest drops the tag."""
    name, tag, digest = split_image(image)
    if name != entry["name"]:
        return image
    name = entry.get("newName", name)
    new_tag, new_digest = entry.get("newTag"), entry.get("digest")
    if new_tag or new_digest:
        tag, digest = new_tag or "", new_digest or ""
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def containers_anywhere(node):
    """Every container map under a `containers` or `initContainers` list, at any depth:
    kustomize's image transformer finds them so in any kind, custom resources too."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from containers_anywhere(value)
    elif isinstance(node, list):
        for item in node:
            yield from containers_anywhere(item)


def apply_images(objects: list[dict], entries: list[dict], origin: str) -> None:
    for entry in entries:
        refuse_unknown(entry, IMAGE_FIELDS, f"{origin}: images entry")
        for obj in objects:
            for container in containers_anywhere(obj):
                if "image" in container:
                    container["image"] = new_image(container["image"], entry)


# ---------------------------------------------------------------- replacements


def split_path(path: str) -> list[str]:
    """A kustomize field path's parts: split on dots, except inside [key=value]."""
    return re.findall(r"\[[^\]]*\]|[^.\[\]]+", path)


def walk(obj: dict, path: str, origin: str):
    """(parent, key) of the field at `path`; the field itself must exist."""
    *parents, last = split_path(path)
    node = obj
    for part in [*parents, last]:
        parent = node
        if part.startswith("["):
            key, _, value = part[1:-1].partition("=")
            matches = [i for i, item in enumerate(node if isinstance(node, list) else [])
                       if isinstance(item, dict) and str(item.get(key)) == value]
            if len(matches) != 1:
                raise TransformError(f"{origin}: unable to find field {path!r}")
            part = matches[0]
        elif not isinstance(node, dict) or part not in node:
            raise TransformError(f"{origin}: unable to find field {path!r}")
        node = node[part]
    return parent, part


def select(objects: list[dict], selector: dict) -> list[dict]:
    return [o for o in objects if o["kind"] == selector.get("kind", o["kind"])
            and o["metadata"]["name"] == selector.get("name", o["metadata"]["name"])]


def apply_replacements(objects: list[dict], replacements: list[dict], origin: str) -> None:
    for replacement in replacements:
        refuse_unknown(replacement, REPLACEMENT_FIELDS, f"{origin}: replacement")
        source = replacement["source"]
        refuse_unknown(source, SOURCE_FIELDS, f"{origin}: replacement source")
        found = select(objects, source)
        if len(found) != 1:
            raise TransformError(f"{origin}: replacement source {source} matches "
                                 f"{len(found)} objects")
        parent, key = walk(found[0], source.get("fieldPath", "metadata.name"), origin)
        value = parent[key]
        for target in replacement["targets"]:
            refuse_unknown(target, TARGET_FIELDS, f"{origin}: replacement target")
            refuse_unknown(target["select"], SELECT_FIELDS, f"{origin}: target select")
            chosen = select(objects, target["select"])
            if not chosen:
                raise TransformError(f"{origin}: replacement target {target['select']} "
                                     f"selects no object")
            for obj in chosen:
                for path in target["fieldPaths"]:
                    parent, key = walk(obj, path, origin)
                    parent[key] = copy.deepcopy(value)
