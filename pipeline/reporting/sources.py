"""Where a pipeline run's report files live: in a workspace (the stages' outputs, as
pipeline.config.Paths names them) or in the MLflow run that trained the model.

One training run holds the whole story, under these artifact paths:

    training/    train_curves.json, train_curves.png (pipeline/modeling/callbacks.py),
                 profile.json, the data profile trained on (pipeline/modeling/training.py)
    evaluation/  metrics.json, gate.json (pipeline/stages/evaluate.py)
    evaluation/plots/  the plot data and PNGs (pipeline/reporting/evaluation_plots.py)

and the bundle that deploy registered from the run (bundle.json, MODEL_CARD.md) is in
the registered model version that names the run.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from pipeline.config import Paths
from serving.bundle import REGISTERED_BUNDLE

TRAINING = "training"
EVALUATION = "evaluation"
EVALUATION_PLOTS = f"{EVALUATION}/plots"
# evaluate's pictures (reports/plots/ in a workspace, evaluation/plots/ in the run),
# in the order a report shows them, with their captions
EVALUATION_IMAGES = {
    "confusion.png": "Confusion matrix (test split)",
    "roc.png": "ROC curve (test split)",
    "pr.png": "Precision-recall curve (test split)",
    "reliability.png": "Reliability diagram: confidence against accuracy (test split)",
}


@dataclass(frozen=True)
class RunFiles:
    """The files one report reads; any of them may be missing."""

    origin: str  # what the report says it was built from
    base: Path  # the files' common root, which `name` leaves out
    metrics: Path
    gate: Path
    plots: Path  # a directory
    train_curves: Path
    train_curves_image: Path
    profile: Path
    bundle_meta: Path
    model_card: Path

    def name(self, path: Path) -> str:
        """How a report names one of the files: as the workspace or the run has it."""
        return path.relative_to(self.base).as_posix()


def workspace_files(root: Path) -> RunFiles:
    """The stages' outputs under `root`; the model card of the candidate bundle that
    deploy last built, else of the current (promoted) one."""
    paths = Paths(root)
    bundle = paths.candidate if paths.candidate.is_dir() else paths.current
    return RunFiles(
        origin=f"workspace {root.resolve()}", base=root, metrics=paths.metrics,
        gate=paths.gate, plots=paths.plots, train_curves=paths.train_curves,
        train_curves_image=paths.train_curves_image,
        profile=paths.processed / "profile.json", bundle_meta=bundle / "bundle.json",
        model_card=bundle / "MODEL_CARD.md")


@contextlib.contextmanager
def mlflow_run_files(run_id: str, uri: str) -> Iterator[RunFiles]:
    """The run's artifacts, downloaded into a temporary directory that is removed when
    the block ends; what the run lacks is left missing."""
    client = mlflow.MlflowClient(uri)
    try:
        client.get_run(run_id)
    except MlflowException as err:
        raise LookupError(f"no MLflow run {run_id} at {uri}: {err.message}") from None
    with tempfile.TemporaryDirectory(prefix="textops-report-") as tmp:
        local = Path(tmp)
        for directory in (TRAINING, EVALUATION):
            fetch(f"runs:/{run_id}/{directory}", local, uri)
        bundle = local / "bundle"
        version = registered_version(client, run_id)
        if version is not None:
            # where the version's files are stored (a models:/ URI would be resolved
            # against the default registry, not the one at `uri`)
            stored = client.get_model_version_download_uri(version.name, version.version)
            for name in ("bundle.json", "MODEL_CARD.md"):
                fetch(f"{stored.rstrip('/')}/{REGISTERED_BUNDLE.as_posix()}/{name}", bundle, uri)
        yield RunFiles(
            origin=f"MLflow run {run_id} ({uri})", base=local,
            metrics=local / EVALUATION / "metrics.json",
            gate=local / EVALUATION / "gate.json", plots=local / EVALUATION_PLOTS,
            train_curves=local / TRAINING / "train_curves.json",
            train_curves_image=local / TRAINING / "train_curves.png",
            profile=local / TRAINING / "profile.json", bundle_meta=bundle / "bundle.json",
            model_card=bundle / "MODEL_CARD.md")


def fetch(artifact_uri: str, dst: Path, uri: str) -> None:
    """Download `artifact_uri` into `dst`; nothing when the run never logged it."""
    dst.mkdir(parents=True, exist_ok=True)
    # A missing artifact raises MlflowException or OSError, depending on the store.
    with contextlib.suppress(MlflowException, OSError):
        mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst),
                                            tracking_uri=uri)


def registered_version(client: mlflow.MlflowClient, run_id: str):
    """The newest registered model version logged from `run_id`, or None."""
    try:
        versions = client.search_model_versions(f"run_id = '{run_id}'")
    except MlflowException:
        return None
    return max(versions, key=lambda v: int(v.version), default=None)
