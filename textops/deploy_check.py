"""What `textops deploy` tells the user before it serves, and when it must not serve.

The pipeline only promotes a model the gate blessed; a refused one leaves
`models/current` where it was, which may be another data set's or task's champion.
Serving that quietly would look like success, so the refusal is said out loud, with
the gate's reasons, and a champion of another data set or task is served only when the
user says so (`--allow-other-data`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from pipeline.config import Paths


@dataclass
class DeployCheck:
    notices: list[str] = field(default_factory=list)  # what to tell the user first
    refusal: str | None = None  # why nothing may be served; None: go ahead
    refused_model: bool = False  # the model just trained was refused at the gate


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def describe(meta: dict, registry: dict | None) -> str:
    version = f" v{registry['registry_version']}" if registry else ""
    return (f"{meta.get('model_name')}{version} (bundle {meta.get('version')}, "
            f"data {meta.get('lineage', {}).get('data')}, task {meta.get('task')})")


def check(cfg: DictConfig, paths: Paths, allow_other_data: bool = False) -> DeployCheck:
    result = DeployCheck()
    report = read_json(paths.deploy_report)
    if report and not report["blessed"]:
        result.refused_model = True
        result.notices += [f"The model just trained, {report['model_name']} (bundle "
                           f"{report['bundle_version']}), was REFUSED at the gate:",
                           *(f"  - {reason}" for reason in report["reasons"]),
                           "  (the gate: conf/gate/default.yaml; the evaluation: "
                           "textops report)"]
    current = read_json(paths.current / "bundle.json")
    if current is None:
        result.refusal = (f"nothing to serve: {paths.current} holds no bundle, as no model "
                          "trained here has passed the gate yet")
        return result
    registry = read_json(paths.current / "registry.json")
    served = describe(current, registry)
    task_name = cfg.task.name
    other = [what for what, theirs, ours in (
        ("data set", current.get("lineage", {}).get("data"), cfg.data.name),
        ("task", current.get("task", task_name), task_name),
        ("model name", current.get("model_name"), cfg.deploy.model_name)) if theirs != ours]
    if other:
        mismatch = (f"{paths.current} is {served}: another {' and '.join(other)} than this "
                    f"pipeline's ({cfg.data.name}, {task_name}, {cfg.deploy.model_name})")
        if not allow_other_data:
            result.refusal = (f"{mismatch}. Refusing to serve it; pass --allow-other-data "
                              "to serve it anyway")
            return result
        result.notices.append(f"{mismatch}; serving it as asked (--allow-other-data).")
    elif result.refused_model:
        result.notices.append(f"Serving the champion instead: {served}.")
    return result
