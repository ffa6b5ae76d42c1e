"""The LightningModule: a model from the task's model families, its loss, metrics and
optimiser.

Trained on labels, the loss is cross-entropy. Trained on a transfer set (pipeline/
stages/transfer.py), whose batches carry a teacher's logits, it is Tang et al.'s (2019):
`distill_weight` x the mean squared error between the student's and the teacher's
logits, plus the rest x cross-entropy on the rows that have a label (the original
sentences; augmented ones carry label -100 and only the teacher's answer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.data.splits import NO_LABEL
from pipeline.tasks.classifier import ClassifierModule, parameter_groups  # noqa: F401
from pipeline.tasks.text_classification.models import build_model


class TextClassifier(ClassifierModule):
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
        optimizer: dict | None = None,  # optimizer_settings; None: AdamW
    ):
        super().__init__()
        # Everything needed to rebuild the model from a checkpoint alone.
        self.save_hyperparameters()
        self.model = build_model(model, vocab_size, num_classes, max_length, pad_id)
        self.init_metrics(num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask)

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        # a batch of the model's fixed features goes to the rest of it
        # (pipeline/tasks/fixed_features.py)
        logits = (self.model.head(batch["features"]) if "features" in batch
                  else self(batch["input_ids"], batch["attention_mask"]))
        labels = batch["labels"]
        loss = self._loss(self.loss_logits(logits, split), labels, batch.get("teacher_logits"))
        labelled = labels != NO_LABEL  # transfer-set copies carry the teacher's answer only
        self.accumulate(split, logits[labelled], labels[labelled], loss, labels.numel())
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


