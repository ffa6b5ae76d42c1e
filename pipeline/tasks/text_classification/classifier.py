"""The LightningModule: a model from the task's model families, its loss, metrics and
optimiser.

Trained on labels, the loss is cross-entropy. Trained on a transfer set (pipeline/
stages/transfer.py), whose batches carry a teacher's logits, it is Tang et al.'s (2019):
`distill_weight` x the mean squared error between the student's and the teacher's
logits, plus the rest x cross-entropy on the rows that have a label (the original
sentences; augmented ones carry label -100 and only the teacher's answer)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import get_cosine_schedule_with_warmup

from pipeline.data.splits import NO_LABEL
from pipeline.tasks.optim import parameter_groups
from pipeline.tasks.text_classification.models import build_model


class TextClassifier(pl.LightningModule):
    def __init__(
        self,
        model: dict,
        vocab_size: int,
        num_classes: int,
        max_length: int,
        pad_id: int,
        label_names: list[str],
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        label_smoothing: float = 0.0,
        distill_weight: float = 0.0,
    ):
        super().__init__()
        # Everything needed to rebuild the model from a checkpoint alone.
        self.save_hyperparameters()
        self.model = build_model(model, vocab_size, num_classes, max_length, pad_id)
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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask)

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"]
        loss = self._loss(logits, labels, batch.get("teacher_logits"))
        labelled = labels != NO_LABEL
        # Accumulated per step, logged once per epoch (_log_epoch): a self.log call per
        # step cost 5-8% of CPU training throughput (bench/bench_training.py).
        if labelled.any():
            getattr(self, f"{split}_metrics").update(logits[labelled], labels[labelled])
        getattr(self, f"{split}_loss").update(loss.detach(), weight=labels.numel())
        return loss

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor,
              teacher_logits: torch.Tensor | None) -> torch.Tensor:
        smoothing = self.hparams.label_smoothing
        if teacher_logits is None:
            return F.cross_entropy(logits, labels, label_smoothing=smoothing)
        weight = self.hparams.distill_weight
        mse = F.mse_loss(logits, teacher_logits)
        if weight >= 1.0 or not (labels != NO_LABEL).any():
            return mse
        # mean over the labelled rows only (ignore_index), 0 for a batch without any
        ce = F.cross_entropy(logits, labels, ignore_index=NO_LABEL, label_smoothing=smoothing)
        return weight * mse + (1.0 - weight) * ce

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

