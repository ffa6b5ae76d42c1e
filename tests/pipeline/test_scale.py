"""Training past one process: DDP on two CPU processes, and resuming a killed run."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
from conftest import ROOT, compose
from omegaconf import OmegaConf

pytestmark = pytest.mark.slow


def train_dir(workspace, tmp_path, *overrides):
    """A directory with the workspace's processed data and a params.yaml."""
    path, base = workspace
    shutil.copytree(path / "data" / "processed", tmp_path / "data" / "processed")
    cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
    cfg.mlflow.tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    OmegaConf.save(cfg, tmp_path / "params.yaml")
    return cfg


def start_training(cwd) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "pipeline.stages.train"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_ddp_on_two_cpu_processes(workspace, tmp_path):
    trainer = OmegaConf.to_container(compose("trainer=ddp_cpu").trainer)
    cfg = train_dir(workspace, tmp_path, *[f"trainer.{k}={v}" for k, v in trainer.items()],
                    "train.max_epochs=2", "train.batch_size=16")
    process = start_training(tmp_path)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    report = json.loads((tmp_path / "reports" / "train.json").read_text())
    rows = report["train_rows"]
    # each of the 2 ranks saw half of every epoch: half the optimizer steps of one process
    assert report["global_step"] == 2 * math.ceil(rows / 2 / 16)
    assert (tmp_path / "models" / "checkpoints" / "best.ckpt").exists()
    assert output.count("train: best") == 1  # only rank 0 reports
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("textops").experiment_id])
    assert len(runs) == 1  # only rank 0 tracks
    history = client.get_metric_history(runs[0].info.run_id, "val_acc")
    assert len(history) == 2 and history[-1].value > 0.5


def loads(checkpoint) -> bool:
    """Whether `checkpoint` exists and is whole (it may be half written)."""
    try:
        torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - any way of being half written
        return False
    return True


@pytest.mark.parametrize("ema_decay", [None, 0.9], ids=["weights", "weight-average"])
def test_a_killed_run_resumes_from_its_last_checkpoint(workspace, tmp_path, ema_decay):
    train_dir(workspace, tmp_path, "train.max_epochs=4", "train.batch_size=4", "train.patience=10",
              f"train.ema_decay={ema_decay or 'null'}")
    work = tmp_path / "models" / "train-work"
    process = start_training(tmp_path)
    deadline = time.monotonic() + 300
    while not loads(work / "last.ckpt") and time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "reports" / "train.json").exists()
    saved = torch.load(work / "last.ckpt", map_location="cpu", weights_only=False)
    saved_run = json.loads((work / "state.json").read_text())["run_id"]
    assert saved["epoch"] < 3, "the run finished before it could be killed"

    process = start_training(tmp_path)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    report = json.loads((tmp_path / "reports" / "train.json").read_text())
    facts = json.loads((tmp_path / "reports" / "runs" / "train.json").read_text())
    assert facts["resumed_from"] == str(work / "last.ckpt").removeprefix(f"{tmp_path}/")
    assert facts["resumed_at"] == {"epoch": saved["epoch"], "global_step": saved["global_step"]}
    assert facts["run_id"] == saved_run  # the same MLflow run continues
    steps_per_epoch = saved["global_step"] // (saved["epoch"] + 1)
    assert report["epochs"] == 4 and report["global_step"] == 4 * steps_per_epoch
    if ema_decay:  # the average went on from the killed run's, not from scratch
        last = torch.load(tmp_path / "models/checkpoints/last.ckpt", map_location="cpu",
                          weights_only=False)
        assert int(last["averaging_state"]["n_averaged"]) == report["global_step"]


@pytest.mark.gpu(1)
def test_gpu_trainer_with_bf16(workspace, tmp_path):
    trainer = OmegaConf.to_container(compose("trainer=gpu").trainer)
    train_dir(workspace, tmp_path, *[f"trainer.{k}={v}" for k, v in trainer.items()],
              "train.max_epochs=1")
    process = start_training(tmp_path)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    assert "GPU available: True, used: True" in output


@pytest.mark.gpu(2)
def test_ddp_on_two_gpus(workspace, tmp_path):
    trainer = OmegaConf.to_container(compose("trainer=ddp").trainer)
    train_dir(workspace, tmp_path, *[f"trainer.{k}={v}" for k, v in trainer.items()],
              "trainer.devices=2", "train.max_epochs=1")
    process = start_training(tmp_path)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    assert output.count("train: best") == 1
