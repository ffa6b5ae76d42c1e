"""What every task's LightningModule shares: the classification metrics accumulated per
step and logged once per epoch under one set of names (train_/val_ acc, f1, loss, so
the shared training loop, its monitor and the training curves read every task alike),
and the optimiser. (Beside the tasks, not in pipeline/modeling/, which imports the
tasks: the folders stay layered.)

A task's module subclasses `ClassifierModule`, calls `init_metrics` in its __init__
(after save_hyperparameters, with lr, weight_decay and warmup_ratio among them) and
implements `_step(batch, split)`, calling `accumulate`.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import get_cosine_schedule_with_warmup


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and embeddings (the usual practice)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # ndim < 2 covers biases and every norm's scale and shift (BatchNorm, GroupNorm,
        # LayerNorm); the names catch embedding tables and norms stored as matrices.
        plain = param.ndim < 2 or "embedding" in name or "norm" in name
        (no_decay if plain else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class ClassifierModule(pl.LightningModule):
    """Metrics, per-epoch logging, the steps and AdamW with a cosine warmup schedule."""

    def init_metrics(self, num_classes: int) -> None:
        metrics = MetricCollection({
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        })
        self.train_metrics = metrics.clone(prefix="train_")
        self.val_metrics = metrics.clone(prefix="val_")
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        raise NotImplementedError

    def accumulate(self, split: str, logits: torch.Tensor, labels: torch.Tensor,
                   loss: torch.Tensor, rows: int) -> None:
        """Add a step's scored rows to the epoch's metrics and its loss (weighted by
        `rows`). Accumulated per step, logged once per epoch: a self.log call per step
        cost 5-8% of CPU training throughput (bench/bench_training.py)."""
        if len(labels):
            getattr(self, f"{split}_metrics").update(logits.detach(), labels)
        getattr(self, f"{split}_loss").update(loss.detach(), weight=rows)

    def _log_epoch(self, split: str) -> None:
        # Logging the metric objects lets Lightning compute them (torchmetrics reduces
        # across DDP ranks) and reset them for the next epoch.
        self.log(f"{split}_loss", getattr(self, f"{split}_loss"))
        self.log_dict(getattr(self, f"{split}_metrics"))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(parameter_groups(self, self.hparams.weight_decay),
                                      lr=self.hparams.lr)
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, int(self.hparams.warmup_ratio * total_steps), total_steps
        )
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}
