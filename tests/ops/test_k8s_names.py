"""Names flow through kustomize: the images' tags, the served model and the MLflow
server are written once (ops/k8s/shared/), and changing one there changes every
rendered manifest that uses it; and the renderer's images, replacements and
components behave as kustomize's."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from manifest_edits import copy_k8s, edit_field

sys.path.insert(0, str(ROOT / "ops" / "k8s"))
import kustomize  # noqa: E402  (ops/k8s/kustomize.py: the renderer)
from kustomize_transforms import containers_anywhere, new_image  # noqa: E402

K8S = ROOT / "ops" / "k8s"
KUBECTL = shutil.which("kubectl")
# What the repository's shared.yaml and kustomization.yaml say today.
MODEL, MLFLOW = "models:/sst2-classifier@champion", "http://mlflow.mlops.svc.cluster.local:5000"
SERVING, PIPELINE = "textops-serving:latest", "textops-pipeline:latest"


def everything(k8s: Path) -> dict[str, list[dict]]:
    """Every kustomization under `k8s`, rendered."""
    return {str(d.relative_to(k8s)): kustomize.render(d)
            for d in sorted(p.parent for p in k8s.rglob("kustomization.yaml"))
            if yaml.safe_load((d / "kustomization.yaml").read_text()).get("kind")
            != "Component"}


def images(objects: list[dict]) -> set[str]:
    return {c["image"] for o in objects for c in containers_anywhere(o)}


def env_values(objects: list[dict], name: str) -> set[str]:
    return {e.get("value") for o in objects for c in containers_anywhere(o)
            for e in c.get("env", []) if e["name"] == name}


def test_each_name_is_written_once():
    """No manifest outside ops/k8s/shared/ names the model, the MLflow server or an
    image's tag: a second copy would be the one somebody forgets to change."""
    for path in K8S.rglob("*.yaml"):
        if "shared" in path.parts:
            continue
        text = path.read_text()
        for value in ("sst2-classifier", "mlflow.mlops.svc", ":latest"):
            assert value not in text, (path, value)


def test_the_rendered_manifests_carry_the_shared_names():
    rendered = everything(K8S)
    assert images(rendered["base"]) == images(rendered["overlays/champion"]) == {SERVING}
    assert images(rendered["kserve/serverless"]) == images(rendered["kserve/raw"]) == {SERVING}
    assert images(rendered["retrain"]) == images(rendered["overlays/secure-retrain"]) \
        == {PIPELINE}
    for where in ("overlays/champion", "kserve/serverless", "kserve/raw"):
        assert env_values(rendered[where], "TEXTOPS_BUNDLE") == {MODEL}, where
    for where in ("overlays/champion", "kserve/serverless", "kserve/raw", "retrain",
                  "overlays/secure-retrain"):
        assert env_values(rendered[where], "MLFLOW_TRACKING_URI") == {MLFLOW}, where
    # the source of the values stays out of what is applied
    assert not any(o["kind"] == "ConfigMap" for objects in rendered.values() for o in objects)


def test_changing_a_name_in_one_file_changes_every_rendered_occurrence(tmp_path):
    k8s = copy_k8s(tmp_path)
    shared = k8s / "shared"
    edit_field(shared, "shared.yaml", "data.bundle", "models:/reviews@challenger")
    edit_field(shared, "shared.yaml", "data.mlflow-tracking-uri", "http://mlflow.team:5000")
    edit_field(shared, "kustomization.yaml", "images.0.newTag", "v7")
    edit_field(shared, "kustomization.yaml", "images.0.newName", "registry.example/serving")
    edit_field(shared, "kustomization.yaml", "images.1.newTag", "2026-01")
    rendered = everything(k8s)
    text = json.dumps(rendered)
    for old in (MODEL, MLFLOW, SERVING, PIPELINE):
        assert old not in text, old
    # base, champion, secure, serverless, raw
    assert text.count("registry.example/serving:v7") == 5
    # retrain, secure-retrain
    assert text.count("textops-pipeline:2026-01") == 2
    assert text.count("models:/reviews@challenger") == 4
    assert text.count("http://mlflow.team:5000") == 6
    if KUBECTL:  # and kustomize itself renders the copy the same way
        for directory in ("overlays/champion", "kserve/raw", "retrain"):
            ours = kustomize.render(k8s / directory)
            assert kustomize.disagreement(ours, kustomize.kubectl_render(k8s / directory)) \
                is None


@pytest.mark.parametrize("image,entry,expected", [
    ("textops-serving", {"newTag": "v2"}, "textops-serving:v2"),
    ("textops-serving:latest", {"newName": "reg:5000/ts"}, "reg:5000/ts:latest"),
    ("textops-serving:1@sha256:aa", {"newTag": "2"}, "textops-serving:2"),
    ("textops-serving:1", {"digest": "sha256:bb"}, "textops-serving@sha256:bb"),
    ("reg:5000/textops-serving", {"newTag": "v2"}, "reg:5000/textops-serving"),  # another
    ("textops-serving-gpu:1", {"newTag": "v2"}, "textops-serving-gpu:1"),  # another
])
def test_an_images_entry_rewrites_only_its_own_image(image, entry, expected):
    assert new_image(image, {"name": "textops-serving", **entry}) == expected


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


CONFIG = """apiVersion: v1
kind: ConfigMap
metadata: {name: names, annotations: {config.kubernetes.io/local-config: "true"}}
data: {model: m}
"""


def test_a_component_included_twice_is_refused(tmp_path):
    write(tmp_path / "names", {"kustomization.yaml": "kind: Component\nresources: [c.yaml]\n",
                               "c.yaml": CONFIG})
    write(tmp_path / "a", {"kustomization.yaml": "components: [../names]\n"})
    top = write(tmp_path / "b", {"kustomization.yaml": "resources: [../a]\n"
                                                      "components: [../names]\n"})
    with pytest.raises(kustomize.ManifestError, match="ConfigMap/names more than once"):
        kustomize.render(top)


def test_a_replacement_that_selects_nothing_is_refused(tmp_path):
    """kustomize would leave the old value in place without a word."""
    top = write(tmp_path, {"c.yaml": CONFIG, "kustomization.yaml": """resources: [c.yaml]
replacements:
  - source: {kind: ConfigMap, name: names, fieldPath: data.model}
    targets:
      - select: {kind: Deployment, name: textopz}
        fieldPaths: [spec.replicas]
"""})
    with pytest.raises(kustomize.ManifestError, match="selects no object"):
        kustomize.render(top)


def test_a_targeted_patch_may_select_nothing_an_untargeted_one_may_not(tmp_path):
    """As kustomize: a patch with a `target` changes what it selects, maybe nothing, so
    one component can patch the Deployment or the CronJob, whichever a kustomization
    has (components/tls, components/log-encryption); a patch without one must find its
    object."""
    plain = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: names}\ndata: {model: m}\n"
    patch = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: textops}\nspec: {}\n"
    component = write(tmp_path / "component", {"p.yaml": patch, "kustomization.yaml": (
        "kind: Component\npatches:\n  - path: p.yaml\n"
        "    target: {kind: Deployment, name: textops}\n")})
    top = write(tmp_path / "top", {"c.yaml": plain, "kustomization.yaml":
                                   "resources: [c.yaml]\ncomponents: [../component]\n"})
    assert kustomize.render(top) == [yaml.safe_load(plain)]
    if KUBECTL:
        assert kustomize.disagreement(kustomize.render(top), kustomize.kubectl_render(top)) \
            is None
    (component / "kustomization.yaml").write_text(
        "kind: Component\npatches:\n  - path: p.yaml\n")
    with pytest.raises(kustomize.ManifestError, match="matches 0 objects"):
        kustomize.render(top)
