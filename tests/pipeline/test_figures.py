"""The pictures: evaluate's PNGs (confusion, ROC, precision-recall, reliability) and
the training curves that a Lightning callback writes after every epoch."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from conftest import ROOT
from PIL import Image
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from test_evaluate import random_predictions
from torch.utils.data import DataLoader, TensorDataset

from pipeline import atomic
from pipeline.modeling.callbacks import TrainingCurves
from pipeline.reporting import figures, sources
from pipeline.reporting.evaluation_plots import write_plots
from pipeline.tasks.scoring import compute_metrics


def picture(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes every pixel: a truncated or corrupt PNG fails here
    return image


def colours(image: Image.Image) -> int:
    return len(image.convert("RGB").getcolors(maxcolors=1 << 20) or [])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """reports/plots/ as evaluate writes it, for 300 rows of three classes."""
    probs, labels = random_predictions(300, 3)
    names = ["neg", "neutral", "pos"]
    metrics = compute_metrics(probs, labels, names, calibration_bins=15)
    plots = tmp_path_factory.mktemp("reports") / "plots"
    write_plots(plots, probs, labels, names, metrics, 15)
    return plots, probs, labels, names, metrics


def test_evaluate_writes_every_picture_beside_the_plot_data(evaluated):
    plots, *_ = evaluated
    assert sorted(p.name for p in plots.iterdir()) == sorted(
        ["confusion.json", "roc.json", "pr.json", *sources.EVALUATION_IMAGES])
    for name in sources.EVALUATION_IMAGES:
        image = picture((plots / name).read_bytes())
        assert image.format == "PNG" and image.size == (500, 400), name
        assert colours(image) > 10, f"{name} is blank"
        assert (plots / name).stat().st_size < 100_000, f"{name} is too large for a report"


def test_pictures_are_the_same_bytes_for_the_same_numbers(evaluated, tmp_path):
    """DVC tracks them as stage outputs: a rerun must not change dvc.lock."""
    plots, probs, labels, names, metrics = evaluated
    write_plots(tmp_path / "again", probs, labels, names, metrics, 15)
    for name in sources.EVALUATION_IMAGES:
        assert (tmp_path / "again" / name).read_bytes() == (plots / name).read_bytes(), name
    other = compute_metrics(probs[::-1].copy(), labels, names)
    assert figures.confusion_png(other["confusion_matrix"], names) != \
        (plots / "confusion.png").read_bytes()


def test_the_reliability_diagram_bins_as_the_reported_ece_does(evaluated):
    _, probs, labels, _, metrics = evaluated
    bins = figures.reliability_bins(probs, labels, 15)
    assert bins["ece"] == pytest.approx(metrics["ece"], abs=1e-6)
    assert bins["count"].sum() == len(labels)
    # a confident, always-right model sits on the diagonal's top end: no gap
    perfect = np.eye(3)[labels] * 0.999 + 0.0005
    assert figures.reliability_bins(perfect, labels, 15)["ece"] == pytest.approx(0.0, abs=1e-3)


def test_dvc_shows_every_picture_and_the_training_curves():
    listed = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    images = {entry for entry in listed if isinstance(entry, str)}
    assert {f"reports/plots/{name}" for name in sources.EVALUATION_IMAGES} <= images
    assert "reports/train_curves.png" in images
    curves = [next(iter(entry.values())) for entry in listed if isinstance(entry, dict)
              and "reports/train_curves.json" in str(next(iter(entry.values())).get("y"))]
    plotted = {name for entry in curves for name in entry["y"]["reports/train_curves.json"]}
    assert {"train_loss", "val_loss", "val_acc", "val_f1"} <= plotted
    assert all(entry["x"] == "epoch" for entry in curves)
    outs = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["outs"]
    assert {"reports/train_curves.json", "reports/train_curves.png"} <= set(outs)


# ---------------------------------------------------------------- training curves


class Tiny(pl.LightningModule):
    """Logs its epoch metrics from the epoch-end hooks, as TextClassifier does, and
    remembers what it logged."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
        self.steps: dict[str, list] = {"train": [], "val": []}
        self.logged: list[dict] = []

    def _loss(self, batch, split: str) -> torch.Tensor:
        x, y = batch
        logits = self.layer(x)
        self.steps[split].append((F.cross_entropy(logits, y).detach(),
                                  (logits.argmax(1) == y).float().mean()))
        return F.cross_entropy(logits, y)

    def training_step(self, batch, batch_idx):
        return self._loss(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._loss(batch, "val")

    def _log_epoch(self, split: str) -> None:
        loss, acc = (torch.stack(v).mean() for v in zip(*self.steps[split], strict=True))
        self.steps[split].clear()
        self.log(f"{split}_loss", loss)
        self.log(f"{split}_acc", acc)
        if split == "train":
            self.logged.append({"train_loss": float(loss)})
        else:
            self.logged.append({"val_loss": float(loss), "val_acc": float(acc)})

    def on_train_epoch_end(self):
        self._log_epoch("train")

    def on_validation_epoch_end(self):
        self._log_epoch("val")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def loader(seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, generator=generator)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)


def tiny_fit(curves: TrainingCurves, epochs: int, root, logger=False, resume=None,
             callbacks=()) -> Tiny:
    """A real Trainer fit of a tiny model, saving last.ckpt under `root` each epoch."""
    torch.manual_seed(0)
    module = Tiny()
    trainer = pl.Trainer(
        max_epochs=epochs, logger=logger, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu",
        default_root_dir=root, log_every_n_steps=1,
        callbacks=[ModelCheckpoint(dirpath=root, save_last=True), curves, *callbacks])
    trainer.fit(module, loader(0), loader(1), ckpt_path=resume)
    return module


class FileWatcher(Callback):
    """How many rows the curves file holds as each epoch starts."""

    def __init__(self, path):
        self.path, self.seen = path, []

    def on_train_epoch_start(self, trainer, pl_module):
        self.seen.append(len(json.loads(self.path.read_text())) if self.path.exists() else 0)


def test_training_curves_hold_each_epochs_own_metrics_as_training_runs(tmp_path):
    data, image = tmp_path / "reports/train_curves.json", tmp_path / "reports/train_curves.png"
    watcher = FileWatcher(data)
    module = tiny_fit(TrainingCurves(data, image), 3, tmp_path / "work", callbacks=[watcher])
    assert watcher.seen == [0, 1, 2]  # on disk after every epoch, not only at the end
    rows = atomic.read_json(data)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert [row["step"] for row in rows] == [4, 8, 12]
    # each row holds its own epoch's values, as the module logged them (not the last
    # epoch's: the module logs its training metrics after callbacks' epoch-end hooks)
    train = [entry for entry in module.logged if "train_loss" in entry]
    val = [entry for entry in module.logged if "val_loss" in entry]
    for row, t, v in zip(rows, train, val, strict=True):
        assert row["train_loss"] == pytest.approx(t["train_loss"])
        assert row["val_loss"] == pytest.approx(v["val_loss"])
        assert row["val_acc"] == pytest.approx(v["val_acc"])
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # it learns: the curves move
    drawn = picture(image.read_bytes())
    assert drawn.size == (900, 360) and colours(drawn) > 10


def test_a_resumed_fit_continues_the_curves(tmp_path):
    data, image = tmp_path / "train_curves.json", tmp_path / "train_curves.png"
    tiny_fit(TrainingCurves(data, image), 2, tmp_path / "work")
    first = atomic.read_json(data)
    # the killed run had also written a row for an epoch its checkpoint never saw
    atomic.write_json(data, [*first, {**first[-1], "epoch": 3, "train_loss": 99.0}])
    tiny_fit(TrainingCurves(data, image), 4, tmp_path / "work",
             resume=tmp_path / "work/last.ckpt")
    rows = atomic.read_json(data)
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert rows[:2] == first and rows[2]["train_loss"] != 99.0
