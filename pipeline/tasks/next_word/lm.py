"""The LightningModule for next-word prediction: a language model from models.py,
token cross-entropy, and per-epoch train_loss, val_loss, val_ppl, val_acc (top-1)
and val_top5.

The optimiser (AdamW, cosine schedule with warm-up) and the steps are every task's
(pipeline/tasks/classifier.py); only the metrics differ. Each is a torchmetrics
MeanMetric accumulated per step, weighted by the step's real tokens, and logged once
per epoch, as the classifiers' are (a self.log per step costs CPU throughput), so
Lightning reduces them across DDP ranks and the training curves read them alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from pipeline.data.splits import NO_LABEL
from pipeline.tasks.classifier import ClassifierModule
from pipeline.tasks.next_word.models import build_model


class PerplexityMetric(MeanMetric):
    """exp of the token-weighted mean cross-entropy: perplexity over the epoch's tokens
    (not the mean of per-batch perplexities, which overweights short batches)."""

    def compute(self) -> torch.Tensor:
        return super().compute().exp()


def ranks(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many tokens score above the right one at each position (0: top-1), for
    logits [n, V] and labels [n]. One comparison, where torchmetrics' top-k accuracy
    would build [n, V] one-hot tensors per step."""
    right = logits.gather(1, labels[:, None])
    return (logits > right).sum(1)


class NextWordModule(ClassifierModule):
    def __init__(
        self,
        model: dict,
        vocab_size: int,
        pad_id: int,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        label_names: list[str] | None = None,  # none: the service's shared field
        optimizer: dict | None = None,  # optimizer_settings; None: AdamW
    ):
        super().__init__()
        # Everything needed to rebuild the model from a checkpoint alone.
        self.save_hyperparameters()
        self.model = build_model(dict(model), vocab_size)
        self.init_metrics()

    def init_metrics(self, num_classes: int | None = None) -> None:
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.val_ppl = PerplexityMetric()
        self.val_acc = MeanMetric()
        self.val_top5 = MeanMetric()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Logits [b, t, V]; no cache (training and scoring whole blocks)."""
        return self.model(input_ids, attention_mask, use_cache=False)[0]

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        # Batches are padded on the right: a causal model's real positions never see
        # the padding after them, so no mask is needed (and the LSTM takes its fast
        # whole-block path).
        logits = self(batch["input_ids"]).flatten(0, 1)
        labels = batch["labels"].flatten()
        loss = F.cross_entropy(logits, labels, ignore_index=NO_LABEL)
        self.accumulate(split, logits, labels, loss, int((labels != NO_LABEL).sum()))
        return loss

    def accumulate(self, split: str, logits: torch.Tensor, labels: torch.Tensor,
                   loss: torch.Tensor, rows: int) -> None:
        """Add a step's `rows` real tokens to the epoch's metrics."""
        if not rows:
            return
        loss = loss.detach()
        getattr(self, f"{split}_loss").update(loss, weight=rows)
        if split == "val":
            real = labels != NO_LABEL
            rank = ranks(logits.detach()[real], labels[real])
            self.val_ppl.update(loss, weight=rows)
            self.val_acc.update((rank < 1).float())
            self.val_top5.update((rank < 5).float())

    def _log_epoch(self, split: str) -> None:
        # Logging the metric objects lets Lightning compute and reset them.
        self.log(f"{split}_loss", getattr(self, f"{split}_loss"))
        if split == "val":
            for name in ("ppl", "acc", "top5"):
                self.log(f"val_{name}", getattr(self, f"val_{name}"))
