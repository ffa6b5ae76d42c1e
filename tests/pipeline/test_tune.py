"""tune: an Optuna search on a tiny budget, nested in MLflow, feeding the pipeline."""

from __future__ import annotations

import shutil

import mlflow
import pytest
import yaml
from conftest import ROOT, tracking_in

from pipeline.config import Paths
from pipeline.loops.tune import tune

pytestmark = pytest.mark.slow


def test_tune_writes_the_best_configuration_for_the_pipeline(workspace, tmp_path):
    path, _ = workspace
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    uri = tracking_in(tmp_path, "textops")
    # the workspace's tokenizer is trained on its own rows, so no MiniLM start
    result = tune(["experiment=smoke", f"mlflow.tracking_uri={uri}", "tune.trials=3",
                   "train.init_embeddings=null",
                   "tune.max_epochs=2", "tune.limit_train_batches=1.0",
                   "tune.space.model=[transformer_tiny]", "tune.space.batch_size=[16,32]"],
                  Paths(path), conf_dir=tmp_path / "conf",
                  params_file=tmp_path / "params.yaml")
    assert len(result["trials"]) == 3
    assert set(result["trials"]) <= {"COMPLETE", "PRUNED"}

    client = mlflow.MlflowClient(uri)
    children = client.search_runs(
        [client.get_experiment_by_name("textops").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    assert len(children) == 3
    finished = [r for r in children if r.data.metrics.get("val_f1") is not None]
    assert max(r.data.metrics["val_f1"] for r in finished) == pytest.approx(
        result["best_value"], abs=1e-6)
    parent = client.get_run(result["parent_run_id"])
    assert parent.data.params["best_lr"] == str(result["best_params"]["lr"])

    tuned = (tmp_path / "conf" / "experiment" / "tuned.yaml").read_text()
    assert "override /model: transformer_tiny" in tuned
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert params["train"]["lr"] == pytest.approx(result["best_params"]["lr"])
    assert params["train"]["batch_size"] == result["best_params"]["batch_size"]
    assert params["model"]["dropout"] == pytest.approx(result["best_params"]["dropout"])
    assert params["model"]["d_model"] == 32  # transformer_tiny
