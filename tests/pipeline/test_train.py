"""train: checkpoints, the report and the MLflow run (on the shared workspace)."""

from __future__ import annotations

import shutil

import mlflow
import torch
from conftest import tracking_in
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback

from pipeline import atomic
from pipeline.config import Paths
from pipeline.modeling.training import fit
from pipeline.tasks.text_classification.datamodule import TextDataModule, collate
from pipeline.tasks.text_classification.inference import load_module
from pipeline.tracking import lineage


def test_fit_writes_checkpoints_report_and_mlflow_run(workspace, monkeypatch):
    path, cfg = workspace
    monkeypatch.chdir(path)
    report = atomic.read_json("reports/train.json")
    facts = atomic.read_json("reports/runs/train.json")
    assert (path / "models/checkpoints/best.ckpt").exists()
    assert (path / "models/checkpoints/last.ckpt").exists()
    assert not (path / "models/train-work").exists()  # finished: nothing to resume
    assert report["epochs"] == 2 and report["global_step"] > 0
    assert report["best_score"] > 0.9  # the synthetic task is easy

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(facts["run_id"])
    assert run.data.params["train/lr"] == str(cfg.train.lr)
    assert run.data.params["model/d_model"] == str(cfg.model.d_model)
    assert run.data.tags["data_hash"] == "abc"
    assert run.data.tags["git_commit"]
    for metric in ("train_loss", "train_acc", "train_f1", "val_loss", "val_acc", "val_f1"):
        assert len(client.get_metric_history(run.info.run_id, metric)) == 2, metric
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert artifacts == ["checkpoints/best.ckpt"]
    # the per-epoch curves (DVC plots) and the data profile, for the run's report
    assert [row["epoch"] for row in atomic.read_json("reports/train_curves.json")] == [1, 2]
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "training")) == [
        "training/profile.json", "training/train_curves.json", "training/train_curves.png"]
    # the run is found from the checkpoint's bytes, as evaluate and deploy find it
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    assert lineage.training_run(cfg.mlflow.experiment, path / "models/checkpoints/best.ckpt"
                                ) == run.info.run_id
    # the DVC-tracked report holds no fact of this one run
    assert not {"run_id", "wall_time_s", "sequences_per_s"} & set(report)
    assert facts["wall_time_s"] > 0 and facts["sequences_per_s"] > 0


def test_final_checkpoints_hold_no_absolute_path(workspace):
    """Lightning records its checkpoint directory as an absolute path; two clones in
    two directories must still write the same checkpoint bytes."""
    path, _ = workspace
    saved = torch.load(path / "models/checkpoints/best.ckpt", map_location="cpu",
                       weights_only=False)
    recorded = [value for state in saved["callbacks"].values() for value in
                [*state.values(), *state.get("best_k_models", {})] if isinstance(value, str)]
    assert "models/train-work/best.ckpt" in recorded
    assert not [value for value in recorded if str(path) in value or value.startswith("/")]


def padding_efficiency(batches) -> float:
    """Real tokens over all tokens in the padded batches."""
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    return real / sum(b["input_ids"].numel() for b in batches)


def test_batches_are_padded_per_batch_and_grouped_by_length(workspace):
    path, _ = workspace
    dm = TextDataModule(pad_id=0, batch_size=16, seed=1, processed_dir=path / "data/processed")
    dm.setup()
    # rows of 2 to 60 tokens, as in SST-2, where a random order pads about half the batch
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 61, (len(dm.rows["train"]),), generator=generator).tolist()
    dm.rows["train"] = [([5] * n, i % 2) for i, n in enumerate(lengths)]
    batches = list(dm.train_dataloader())
    assert sum(len(b["labels"]) for b in batches) == len(lengths)
    for batch in batches:
        # padded to this batch's longest row, not to max_length
        assert batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1]
    assert padding_efficiency(batches) > 0.8  # about 0.84 with 360 rows, 0.95 on SST-2
    shuffled = torch.utils.data.DataLoader(dm.rows["train"], batch_size=16, shuffle=True,
                                           collate_fn=dm.collate, generator=generator)
    assert padding_efficiency(shuffled) < 0.65  # about 0.54: what grouping saves


def test_collate_masks_padding():
    batch = collate([([2, 5, 6], 1), ([2, 7], 0)], pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 5, 6], [2, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert torch.equal(batch["labels"], torch.tensor([1, 0]))


class WeightsAfterEachStep(Callback):
    """Copies of the model's weights after every optimizer step, as training left them."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def test_ema_decay_ships_the_moving_average_of_the_weights(workspace, tmp_path):
    """With train.ema_decay, the checkpoint that evaluate and deploy load holds the
    exponential moving average of the weights over the optimizer steps (the known
    answer, computed here step by step), not the last step's weights."""
    path, cfg = workspace
    decay = 0.9
    cfg = OmegaConf.merge(cfg, {"train": {"ema_decay": decay, "max_epochs": 1},
                                "mlflow": {"tracking_uri": tracking_in(
                                    tmp_path, cfg.mlflow.experiment)}})
    recorder = WeightsAfterEachStep()
    run = Paths(tmp_path)
    shutil.copytree(path / "data/processed", run.processed)
    fit(cfg, run, callbacks=[recorder])

    assert len(recorder.steps) > 3
    expected = dict(recorder.steps[0])
    for weights in recorder.steps[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    shipped = load_module(run.checkpoint).state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(shipped[name], value, rtol=1e-5, atol=1e-6)
    last = recorder.steps[-1]
    assert any(not torch.allclose(shipped[k], last[k]) for k in last if last[k].is_floating_point())
