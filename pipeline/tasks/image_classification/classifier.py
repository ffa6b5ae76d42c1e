"""The LightningModule for images: a model from models.py and cross-entropy; metrics,
per-epoch logging and the optimiser are every task's (pipeline/tasks/classifier.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.tasks.classifier import ClassifierModule
from pipeline.tasks.image_classification.models import build_model


class ImageClassifier(ClassifierModule):
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
        optimizer: dict | None = None,  # optimizer_settings; None: AdamW
    ):
        super().__init__()
        # Everything needed to rebuild the model from a checkpoint alone.
        self.save_hyperparameters()
        self.model = build_model(model, channels, height, width, num_classes)
        self.init_metrics(num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        # a batch of the model's fixed features goes to the rest of it
        # (pipeline/tasks/fixed_features.py)
        logits = (self.model.head(batch["features"]) if "features" in batch
                  else self(batch["pixels"]))
        labels = batch["labels"]
        loss = F.cross_entropy(self.loss_logits(logits, split), labels,
                               label_smoothing=self.hparams.label_smoothing)
        self.accumulate(split, logits, labels, loss, labels.numel())
        return loss

