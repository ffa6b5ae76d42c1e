"""A throw-away copy of the repository, as a fresh clone would hold it, for benchmarks
that run the pipeline without touching the workspace, its outputs or its registry."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(Path.home())}


def sh(repo: Path, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=repo, env=ENV, check=True, text=True)


def clone_to(repo: Path, overrides: list[str]) -> Path:
    """Tracked and untracked-but-not-ignored files, params.yaml composed with
    `overrides`, committed to a new git repository (DVC experiments need one)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    sh(repo, sys.executable, "-m", "pipeline.config", *overrides)
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "-c", "user.email=bench@textops", "-c", "user.name=bench", "add", "-A")
    sh(repo, "git", "-c", "user.email=bench@textops", "-c", "user.name=bench", "commit",
       "-qm", "bench")
    return repo
