"""Lightning callbacks the train stage adds: what a stage log shows while a model
trains (a line per epoch, periodic progress with rate and time left), the training
curves (DVC plot data and a picture, also in MLflow), and the weight average that
`train.ema_decay` turns on."""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, WeightAveraging
from pytorch_lightning.loggers import MLFlowLogger
from torch.optim.swa_utils import get_ema_multi_avg_fn

from pipeline import atomic
from pipeline.reporting import figures, sources


class EpochSummary(Callback):
    """One line per epoch on stdout, since the progress bar is off in stage logs.

    Printed when the next epoch starts or training ends: Lightning calls callbacks'
    on_train_epoch_end before the LightningModule's, which logs the training metrics.
    """

    def __init__(self):
        self.finished_epoch: int | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        self.finished_epoch = trainer.current_epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._print(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        self._print(trainer)

    def _print(self, trainer: pl.Trainer) -> None:
        if self.finished_epoch is None or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        shown = "  ".join(f"{k} {float(metrics[k]):.4f}" for k in
                          ("train_loss", "train_acc", "val_loss", "val_acc", "val_f1",
                           "val_ppl")  # (val_ppl: next-word prediction)
                          if k in metrics)
        print(f"epoch {self.finished_epoch + 1}/{trainer.max_epochs}: {shown}", flush=True)
        self.finished_epoch = None


class Progress(Callback):
    """A line every `every_s` seconds while an epoch trains: step, rate and the time
    left, so a long epoch (a MiniLM epoch takes ~26 minutes on 2 CPU cores) is never
    silent in a stage log or CI."""

    def __init__(self, every_s: float = 30.0):
        self.every_s = every_s
        self.started = self.last = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        self.started = self.last = time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch,
                           batch_idx: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s or not trainer.is_global_zero:
            return
        self.last = now
        done, total = batch_idx + 1, trainer.num_training_batches
        rate = done / (now - self.started)
        left = (total - done) / rate if rate else float("inf")
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: batch {done}/{total} "
              f"({done / total:.0%}), {rate * len(batch['labels']):.0f} examples/s, "
              f"epoch ends in {left / 60:.1f} min", flush=True)


class TrainingCurves(Callback):
    """Every metric the module logs (train and validation loss, accuracy, F1), one row
    per epoch, rewritten atomically to `data_path` as each epoch ends: DVC's plot data,
    which `dvc plots show` draws while training still runs. When training ends, the
    curves are drawn to `image_path` and both files are logged to the MLflow run.

    A row is taken when the next epoch starts or training ends, as EpochSummary's line
    is: the module logs its training metrics after callbacks' on_train_epoch_end.
    """

    def __init__(self, data_path: Path, image_path: Path):
        self.data_path, self.image_path = Path(data_path), Path(image_path)
        self.rows: list[dict] = []
        self.finished: tuple[int, int] | None = None  # (epoch, step) awaiting its row

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        # A resumed fit starts after its checkpoint's epoch: keep the rows the killed
        # run wrote up to there, so the curves run on from the first epoch.
        self.rows = []
        if trainer.current_epoch > 0 and self.data_path.exists():
            self.rows = [row for row in atomic.read_json(self.data_path)
                         if row["epoch"] <= trainer.current_epoch]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        self.finished = (trainer.current_epoch + 1, trainer.global_step)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._record(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        self._record(trainer)
        if not trainer.is_global_zero or not self.rows:
            return
        atomic.write_bytes(self.image_path, figures.training_curves_png(self.rows))
        logger = trainer.logger
        if isinstance(logger, MLFlowLogger):
            for path in (self.data_path, self.image_path):
                logger.experiment.log_artifact(logger.run_id, str(path), sources.TRAINING)

    def _record(self, trainer: pl.Trainer) -> None:
        if self.finished is None:
            return
        epoch, step = self.finished
        self.finished = None
        logged = {name: float(value) for name, value in sorted(trainer.callback_metrics.items())
                  if value.numel() == 1}
        self.rows.append({"epoch": epoch, "step": step, **logged})
        if trainer.is_global_zero:
            atomic.write_json(self.data_path, self.rows)


class MovingAverage(WeightAveraging):
    """An exponential moving average of the weights, updated after every optimizer
    step, that validation, the checkpoints and so the shipped model see.

    Kept on the device that trains: Lightning sets callbacks up before the strategy
    moves the model there, so the parent class would keep it on the CPU and copy every
    weight across after each GPU step."""

    def __init__(self, decay: float):
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay))

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        self._device = trainer.strategy.root_device
        super().setup(trainer, pl_module, stage)
