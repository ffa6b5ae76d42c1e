"""The LightningModule for images: a model from models.py, cross-entropy, metrics and
the optimiser, with the text classifier's metric names (train_/val_ acc, f1, loss) so
the shared training loop, its monitor and the training curves read both alike."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import get_cosine_schedule_with_warmup

from pipeline.tasks.image_classification.models import build_model
from pipeline.tasks.optim import parameter_groups


class ImageClassifier(pl.LightningModule):
    def __init__(
        self,
        model: dict,
        channels: int,
        height: int,
        width: int,
        num_classes: int,
        label_names: list[str],
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        # Everything needed to rebuild the model from a checkpoint alone.
        self.save_hyperparameters()
        self.model = build_model(model, channels, height, width, num_classes)
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
            }
        )
        self.train_metrics = metrics.clone(prefix="train_")
        self.val_metrics = metrics.clone(prefix="val_")
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        logits = self(batch["pixels"])
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        # Accumulated per step, logged once per epoch (_log_epoch): a self.log call per
        # step costs several per cent of CPU training throughput.
        getattr(self, f"{split}_metrics").update(logits.detach(), labels)
        getattr(self, f"{split}_loss").update(loss.detach(), weight=labels.numel())
        return loss

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
