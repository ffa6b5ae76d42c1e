"""Copies of ops/k8s/ for tests to change or break, and the change: the manifest
tests (test_manifests.py, test_k8s_names.py, test_monitoring.py, test_retrain_job.py)
edit a copy, never the repository's files."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from conftest import ROOT


def copy_k8s(tmp_path: Path) -> Path:
    """ops/k8s/ and the Dockerfile it is checked against, in a directory of their own."""
    shutil.copytree(ROOT / "ops" / "k8s", tmp_path / "k8s",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    return tmp_path / "k8s"


def set_field(document: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for part in parents:
        document = document[int(part)] if isinstance(document, list) else document[part]
    if isinstance(document, list):
        document[int(last)] = value
    else:
        document[last] = value


def edit_field(k8s: Path, file: str, path: str, value) -> Path:
    """Set one field of one manifest in the copy `k8s`; returns its directory."""
    target = k8s / file
    document = yaml.safe_load(target.read_text())
    set_field(document, path, value)
    target.write_text(yaml.safe_dump(document))
    return target.parent
