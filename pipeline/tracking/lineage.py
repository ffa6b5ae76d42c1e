"""Where a checkpoint came from, and what a run measured.

Stage outputs that DVC tracks hold only what the code, data and parameters determine,
so a rerun from nothing gives the same bytes and leaves `dvc.lock` unchanged. What
belongs to one run (its MLflow run id, wall times, throughput, latencies, the
registry version it got) goes to MLflow and to `reports/runs/<stage>.json`, a record
that DVC does not track.

The MLflow run that trained a checkpoint is found by the checkpoint's content: train
tags its run with the sha256 of the best checkpoint, so evaluate and deploy find the
run on any machine that shares the tracking server, `dvc pull`ed checkpoints included.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow

CHECKPOINT_TAG = "checkpoint_sha256"


def digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def training_run(experiment: str, checkpoint: Path) -> str:
    """The id of the newest MLflow run in `experiment` that trained `checkpoint`."""
    sha = digest(checkpoint)
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list",
                              filter_string=f"tags.{CHECKPOINT_TAG} = '{sha}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise LookupError(f"{checkpoint}: no MLflow run in experiment {experiment!r} is "
                          f"tagged {CHECKPOINT_TAG}={sha[:12]}…; train it against this "
                          "tracking server (dvc repro --force train)")
    return runs[0].info.run_id
