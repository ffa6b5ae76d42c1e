"""What every stage shares: where things live and how the configuration is read.

Stage scripts read `params.yaml`, the composition of `conf/` that `make params` or
`dvc exp run` writes; they never compose `conf/` themselves, so what DVC records as a
stage's params is exactly what the stage used.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# Progress bars are noise in stage logs and CI output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

PARAMS_FILE = Path("params.yaml")

@dataclass(frozen=True)
class Paths:
    """Where every stage reads and writes, under `root`: the repository by default
    (what the stages' main() use and dvc.yaml declares), or a test's own directory.

    One object for every stage, so a test points any stage at a directory of its own
    without changing the working directory."""

    root: Path = Path(".")

    # -- data
    @property
    def external(self) -> Path:
        """The bundled and user-supplied data files that collect reads."""
        return self.root / "data/external"

    @property
    def feedback(self) -> Path:
        """Production feedback exported by `make retrain`, merged by collect."""
        return self.root / "data/feedback"

    @property
    def raw(self) -> Path:
        return self.root / "data/raw"

    @property
    def processed(self) -> Path:
        return self.root / "data/processed"

    @property
    def transfer(self) -> Path:
        """The transfer set with the teacher's logits (distillation)."""
        return self.root / "data/transfer"

    # -- models
    @property
    def teacher(self) -> Path:
        """The teacher's bundle and scores (distillation)."""
        return self.root / "models/teacher"

    @property
    def checkpoints(self) -> Path:
        return self.root / "models/checkpoints"

    @property
    def checkpoint(self) -> Path:
        """The checkpoint evaluate scores and deploy exports."""
        return self.checkpoints / "best.ckpt"

    @property
    def train_work(self) -> Path:
        """Where a running fit keeps its checkpoints, so a killed run can resume."""
        return self.root / "models/train-work"

    @property
    def candidate(self) -> Path:
        return self.root / "models/candidate"

    @property
    def store(self) -> Path:
        """Promoted bundles, one directory per registry version."""
        return self.root / "models/bundles"

    @property
    def current(self) -> Path:
        """The symlink into `store` that names the live bundle."""
        return self.root / "models/current"

    # -- reports
    @property
    def train_report(self) -> Path:
        return self.root / "reports/train.json"

    @property
    def train_facts(self) -> Path:
        return self.run_facts("train")

    @property
    def train_curves(self) -> Path:
        """Per-epoch training and validation metrics, rewritten after every epoch
        (DVC plot data)."""
        return self.root / "reports/train_curves.json"

    @property
    def train_curves_image(self) -> Path:
        """The same curves as a picture, drawn when training ends."""
        return self.train_curves.with_suffix(".png")

    @property
    def metrics(self) -> Path:
        return self.root / "reports/metrics.json"

    @property
    def plots(self) -> Path:
        return self.root / "reports/plots"

    @property
    def gate(self) -> Path:
        return self.root / "reports/gate.json"

    @property
    def deploy_report(self) -> Path:
        return self.root / "reports/deploy.json"

    @property
    def serve_report(self) -> Path:
        return self.root / "reports/serve.json"

    @property
    def report(self) -> Path:
        """The run's one-page HTML report (pipeline/reporting/report.py)."""
        return self.root / "reports/report.html"

    def run_facts(self, stage: str) -> Path:
        """What one run of `stage` measured (run ids, times, latencies): kept out of
        DVC's outputs so that a rerun from nothing leaves dvc.lock unchanged."""
        return self.root / "reports/runs" / f"{stage}.json"


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
