"""A throw-away copy of the repository, as a fresh clone would hold it, for benchmarks
and tests that run the pipeline without touching the workspace, its outputs or its
registry."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(Path.home()),
       # to run two benchmarks side by side on one core each
       **{k: os.environ[k] for k in ("OMP_NUM_THREADS",) if k in os.environ}}
GIT_USER = ["-c", "user.email=copy@textops", "-c", "user.name=copy"]


def sh(repo: Path, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=repo, env=ENV, check=True, text=True)


def copy_repo(dest: Path) -> Path:
    """Tracked and untracked-but-not-ignored files: what a fresh clone would hold."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


def git_init(repo: Path) -> None:
    """Everything committed in a new git repository (DVC experiments need one)."""
    for cmd in (["init", "-q", "-b", "main"], [*GIT_USER, "add", "-A"],
                [*GIT_USER, "commit", "-qm", "copy"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True, capture_output=True)


def clone_to(repo: Path, overrides: list[str]) -> Path:
    """A copy with params.yaml composed with `overrides`, committed."""
    copy_repo(repo)
    sh(repo, sys.executable, "-m", "pipeline.config", *overrides)
    git_init(repo)
    return repo
