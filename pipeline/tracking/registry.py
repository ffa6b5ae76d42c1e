"""registry: the MLflow Model Registry and the bundles on disk that follow it.

Registers a bundle as a new version of the pyfunc model (tagged with the gate's
verdict), promotes a version (the `champion` alias and `models/current`, a symlink
into `models/bundles/` swapped atomically), rolls back to the previous blessed
version, prunes old bundles from disk, and downloads a registered bundle.

Every move of the champion alias is recorded in the audit trail
(pipeline/tracking/audit.py). `textops promote`, `textops rollback` and `textops
history` are its commands.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import shutil
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from PIL import Image

from pipeline import atomic
from pipeline.config import Paths, git_commit
from pipeline.tracking import audit
from pipeline.tracking.cards import fitted
from serving.bundle import REGISTERED_BUNDLE, Bundle
from serving.bundle.pyfunc import BundleModel, input_column

CHAMPION = "champion"

SERVE_REQUIREMENTS = [
    "numpy==2.4.6", "onnxruntime==1.32.0", "tokenizers==0.23.3", "pillow==13.0.0",
    "pandas==3.1.1",
]


class RegistryError(RuntimeError):
    """The registry cannot do what was asked (no champion, nothing to roll back to)."""


def download_bundle(model_name: str, dst: Path, version: str | None = None) -> Path:
    """A registered version's bundle (the champion's when `version` is None), downloaded
    into `dst`; returns the bundle directory."""
    ref = f"@{CHAMPION}" if version is None else f"/{version}"
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}{ref}",
                                                dst_path=str(dst))
    return Path(local) / REGISTERED_BUNDLE


def input_example(bundle: Bundle) -> pd.DataFrame:
    """One request item in the bundle's input column: a text, or a mid-grey PNG of the
    size the model takes."""
    if input_column(bundle) == "text":
        return pd.DataFrame({"text": ["a charming and often affecting journey"]})
    spec = bundle.inputs.spec
    picture = io.BytesIO()
    Image.new("L" if spec.channels == 1 else "RGB", (spec.width, spec.height), 128).save(
        picture, "PNG")
    return pd.DataFrame({"image": [picture.getvalue()]})


def register(bundle_dir: Path, meta: dict, run_id: str) -> str:
    """Log the bundle as a pyfunc model in the training run `run_id`; returns the
    version, tagged with the bundle version, the verdict and the git commit, and
    described by the bundle's model card."""
    serving_dir = Path(__file__).resolve().parents[2] / "serving"
    # The signature comes from the very class MLflow will serve, on this bundle.
    model = BundleModel()
    model.bundle = Bundle.load(bundle_dir, "fp32")
    example = input_example(model.bundle)
    output = model.predict(None, example)
    with tempfile.TemporaryDirectory() as tmp, \
            mlflow.start_run(run_id=run_id):
        # MLflow names the artifact after the directory: REGISTERED_BUNDLE.
        staged = shutil.copytree(bundle_dir, Path(tmp) / REGISTERED_BUNDLE.name)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(serving_dir / "bundle" / "pyfunc.py"),
            artifacts={"bundle": str(staged)},
            code_paths=[str(serving_dir)],
            signature=infer_signature(example, output),
            input_example=example,
            pip_requirements=SERVE_REQUIREMENTS,
            registered_model_name=meta["model_name"],
        )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    tags = {
        "bundle_version": meta["version"],
        "blessed": str(meta["gate"]["blessed"]).lower(),
        "gate_reasons": " | ".join(meta["gate"]["reasons"])[:5000],
        "data_hash": meta["lineage"]["data_hash"],
        "git_commit": git_commit(),
        "accuracy": f"{meta['metrics']['accuracy']:.4f}",
    }
    for key, value in tags.items():
        client.set_model_version_tag(meta["model_name"], version, key, value)
    # The registry shows a version's description as its card; the promotion
    # controller adds its decisions to it (pipeline/promotion/card.py).
    if (card := bundle_dir / "MODEL_CARD.md").is_file():
        client.update_model_version(meta["model_name"], version,
                                    description=fitted(card.read_text(encoding="utf-8")))
    return version


def store_bundle(bundle_dir: Path, record: dict, store: Path) -> Path:
    """Copy a bundle into the store as `<store>/<registry version>`, atomically, with
    `registry.json`: its registry version, MLflow run and git commit, which the
    service reports in /metadata beside bundle.json (which cannot hold them: the same
    training must give the same bundle in every clone)."""
    target = store / record["registry_version"]
    if not target.exists():
        with atomic.atomic_dir(target) as tmp:
            shutil.copytree(bundle_dir, tmp, dirs_exist_ok=True)
            atomic.write_json(tmp / "registry.json", record)
    return target


def registry_record(client: mlflow.MlflowClient, model_name: str, version: str) -> dict:
    found = client.get_model_version(model_name, version)
    return {"model_name": model_name, "registry_version": str(version),
            "mlflow_run_id": found.run_id, "git_commit": found.tags.get("git_commit")}


def point_current(target: Path, current: Path) -> None:
    """Swap the `current` symlink in one rename: readers see the old or the new."""
    current.parent.mkdir(parents=True, exist_ok=True)
    link = current.with_name(f".{current.name}.tmp-{os.getpid()}")
    link.unlink(missing_ok=True)
    link.symlink_to(os.path.relpath(target.resolve(), current.parent.resolve()))
    os.replace(link, current)


def alias_version(client: mlflow.MlflowClient, model_name: str,
                  alias: str = CHAMPION) -> str | None:
    """The version holding `alias` (the champion by default), None if none does."""
    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def promote(model_name: str, version: str, bundle_dir: Path, paths: Paths,
            kind: str = "deploy", by: str | None = None, reason: str = "",
            evidence: dict | None = None) -> Path:
    """Make `version` the champion and the current bundle, and record the move in the
    audit trail (pipeline/tracking/audit.py): `kind` (deploy, promote, rollback,
    decision), who or what moved it (`by`) and why. The bundle's registry.json carries
    the move as its `episode`, which the service shows in /metadata."""
    client = mlflow.MlflowClient()
    record = registry_record(client, model_name, version)
    target = store_bundle(bundle_dir, record, paths.store)
    before = alias_version(client, model_name)
    client.set_registered_model_alias(model_name, CHAMPION, version)
    client.set_model_version_tag(model_name, version, "promoted_at",
                                 dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    point_current(target, paths.current)  # the alias and the served bundle move together
    move = audit.record(client, model_name, CHAMPION, before, version, kind,
                        by or audit.actor(kind), reason, evidence)
    atomic.write_json(target / "registry.json", {**record, "episode": move})
    return target


def rollback(model_name: str, paths: Paths, by: str | None = None, reason: str = "") -> str:
    """Return champion and current to the blessed version before the champion.

    A bundle pruned from disk is downloaded again from the registry, into a temporary
    directory first: an interrupted download leaves nothing in the store, and the next
    rollback downloads it whole (there is no resuming of a partial download).
    """
    client = mlflow.MlflowClient()
    try:
        champion = int(client.get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException:
        raise RegistryError(f"{model_name} has no champion to roll back from") from None
    earlier = [
        int(v.version)
        for v in client.search_model_versions(f"name = '{model_name}'")
        if v.tags.get("blessed") == "true" and int(v.version) < champion
        # a version that lost in production (or was never decided) never served
        and v.tags.get("challenge_outcome") not in ("rollback", "stop_no_difference",
                                                    "replaced")
    ]
    if not earlier:
        raise RegistryError(f"{model_name} v{champion} is the first blessed version")
    previous = str(max(earlier))
    target = paths.store / previous
    if not target.exists():
        with tempfile.TemporaryDirectory() as tmp:
            store_bundle(download_bundle(model_name, Path(tmp), previous),
                         registry_record(client, model_name, previous), paths.store)
    # only once the bundle is on disk: a failed download changes nothing
    client.set_model_version_tag(model_name, str(champion), "rolled_back", "true")
    client.set_registered_model_alias(model_name, CHAMPION, previous)
    move = audit.record(client, model_name, CHAMPION, str(champion), previous, "rollback",
                        by or audit.actor("rollback"),
                        reason or f"back to the blessed version before v{champion}")
    atomic.write_json(target / "registry.json",
                      {**registry_record(client, model_name, previous), "episode": move})
    point_current(target, paths.current)
    return previous


def prune_store(keep: int, paths: Paths) -> None:
    """Keep the newest `keep` bundles in `paths.store`, and the live one whatever its
    age; older ones stay in the registry."""
    if not paths.store.exists():
        return
    live = Path(os.path.realpath(paths.current)).name if paths.current.exists() else None
    versions = sorted((p for p in paths.store.iterdir() if p.name.isdigit()),
                      key=lambda p: int(p.name))
    for old in versions[: max(len(versions) - keep, 0)]:
        if old.name != live:
            shutil.rmtree(old, ignore_errors=True)


def promote_version(model_name: str, version: str, paths: Paths, force: bool = False,
                    kind: str = "promote", by: str | None = None, reason: str = "",
                    evidence: dict | None = None) -> Path:
    """Make a registered `version` the champion and `models/current` by hand
    (`textops promote`, `textops rollback VERSION`: `kind`). A version the gate refused
    needs `force`: promoting it is a decision someone should have to state."""
    client = mlflow.MlflowClient()
    try:
        found = client.get_model_version(model_name, version)
    except MlflowException:
        raise RegistryError(f"{model_name} has no version {version}") from None
    if found.tags.get("blessed") != "true" and not force:
        reasons = found.tags.get("gate_reasons") or "no verdict recorded"
        raise RegistryError(f"{model_name} v{version} was refused at the gate ({reasons}); "
                            "pass --force to promote it anyway")
    if found.tags.get("rolled_back"):  # champion again: no longer the one rolled back from
        client.delete_model_version_tag(model_name, str(version), "rolled_back")
    if force and found.tags.get("blessed") != "true":
        reason = f"{reason}; " if reason else ""
        reason += f"forced past the gate ({found.tags.get('gate_reasons') or 'no verdict'})"
    moved = {"kind": kind, "by": by, "reason": reason or "by hand", "evidence": evidence}
    target = paths.store / str(version)
    if target.exists():
        return promote(model_name, str(version), target, paths, **moved)
    with tempfile.TemporaryDirectory() as tmp:
        return promote(model_name, str(version), download_bundle(model_name, Path(tmp), version),
                       paths, **moved)


def history(model_name: str) -> list[dict]:
    """Every registered version, newest first: its verdict, accuracy, the champion and
    when it was promoted or rolled back from (`textops history`)."""
    client = mlflow.MlflowClient()
    champion = alias_version(client, model_name)
    versions = sorted(client.search_model_versions(f"name = '{model_name}'"),
                      key=lambda v: int(v.version), reverse=True)
    return [{"version": str(v.version), "champion": str(v.version) == champion,
             "blessed": v.tags.get("blessed") == "true",
             "accuracy": v.tags.get("accuracy"), "bundle": v.tags.get("bundle_version"),
             "registered": dt.datetime.fromtimestamp(v.creation_timestamp / 1000, dt.UTC)
             .isoformat(timespec="seconds"),
             "promoted_at": v.tags.get("promoted_at"),
             "rolled_back": v.tags.get("rolled_back") == "true",
             "reasons": v.tags.get("gate_reasons", "")} for v in versions]


def moves(model_name: str) -> list[dict]:
    """Every move of the model's aliases, newest first (`textops history`)."""
    return audit.moves(mlflow.MlflowClient(), model_name)
