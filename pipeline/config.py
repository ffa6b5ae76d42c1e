"""What every stage shares: where things live and how the configuration is read.

Stage scripts read `params.yaml`, the composition of `conf/` that `make params` or
`dvc exp run` writes; they never compose `conf/` themselves, so what DVC records as a
stage's params is exactly what the stage used.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# Progress bars are noise in stage logs and CI output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

PARAMS_FILE = Path("params.yaml")

# Stage outputs, relative to the repository root (dvc.yaml declares the same paths).
RAW_DIR = Path("data/raw")
PROCESSED_DIR = Path("data/processed")
TOKENIZER_FILE = PROCESSED_DIR / "tokenizer.json"
PROFILE_FILE = PROCESSED_DIR / "profile.json"
CHECKPOINT_DIR = Path("models/checkpoints")
BEST_CHECKPOINT = CHECKPOINT_DIR / "best.ckpt"
LAST_CHECKPOINT = CHECKPOINT_DIR / "last.ckpt"
REPORTS_DIR = Path("reports")
TRAIN_REPORT = REPORTS_DIR / "train.json"
METRICS_FILE = REPORTS_DIR / "metrics.json"
PLOTS_DIR = REPORTS_DIR / "plots"
GATE_FILE = REPORTS_DIR / "gate.json"
CANDIDATE_BUNDLE = Path("models/candidate")
BUNDLE_STORE = Path("models/bundles")
CURRENT_BUNDLE = Path("models/current")
DEPLOY_REPORT = REPORTS_DIR / "deploy.json"
SERVE_REPORT = REPORTS_DIR / "serve.json"


def load_params(path: str | Path = PARAMS_FILE) -> DictConfig:
    """The resolved configuration, as composed into params.yaml."""
    return OmegaConf.load(path)


def tracking_uri(cfg: DictConfig) -> str:
    """MLflow tracking URI: the environment wins, so teams can share one server."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri


def git_commit() -> str:
    """The commit the code was run from, with `-dirty` when the tree has changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def compose_params(overrides: list[str], output: str | Path = PARAMS_FILE, conf_dir="conf") -> None:
    """Compose conf/ into params.yaml exactly as `dvc exp run -S ...` does.

    Calls DVC's own composition, so `make params` and DVC can never disagree about
    what the committed params.yaml should contain.
    """
    from dvc.utils.hydra import compose_and_dump

    conf = str(Path(conf_dir).resolve())
    compose_and_dump(output, conf, None, "config", str(Path(conf).parent), overrides)


def compose(overrides: list[str], conf_dir: str | Path = "conf") -> DictConfig:
    """conf/ composed with `overrides`, resolved: what params.yaml would hold."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        compose_params(list(overrides), out, conf_dir)
        return load_params(out)


if __name__ == "__main__":  # `make params` / `python -m pipeline.config model=lstm ...`
    import sys

    compose_params(sys.argv[1:])
