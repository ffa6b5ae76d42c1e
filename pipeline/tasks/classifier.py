"""What every task's LightningModule shares: the classification metrics accumulated per
step and logged once per epoch under one set of names (train_/val_ acc, f1, loss, so
the shared training loop, its monitor and the training curves read every task alike),
and the optimiser. (Beside the tasks, not in pipeline/modeling/, which imports the
tasks: the folders stay layered.)

A task's module subclasses `ClassifierModule`, calls `init_metrics` in its __init__
(after save_hyperparameters, with lr, weight_decay and warmup_ratio among them) and
implements `_step(batch, split)`, calling `accumulate`. Its `optimizer` hyperparameter
(`optimizer_settings`: `train.optimizer`) chooses AdamW or SGD with momentum.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

OPTIMIZERS = ("adamw", "sgd")


def optimizer_settings(cfg: DictConfig) -> dict:
    """`train.optimizer` as a module's `optimizer` hyperparameter: {"name": "adamw"} or
    {"name": "sgd", "momentum": m}. AdamW when the config has none (older params)."""
    settings = cfg.train.get("optimizer")
    settings = OmegaConf.to_container(settings) if settings is not None else {}
    name = settings.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise ValueError(f"train.optimizer.name: unknown optimizer {name!r} "
                         f"({', '.join(OPTIMIZERS)})")
    return {"name": name, "momentum": float(settings.get("momentum", 0.0))}


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


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning rate's factor at `step`: linear from 0 over `warmup_steps`, then half
    a cosine down to 0 at `total_steps` (transformers' get_cosine_schedule_with_warmup)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


class ClassifierModule(pl.LightningModule):
    """Metrics, per-epoch logging, the steps, and AdamW (or SGD) with a cosine warmup
    schedule."""

    # The share of a longer run this fit is, as (fits before it, fits in all): a
    # federated client's local fit in round r of R is (r - 1, R), so its schedule
    # carries on the whole run's rather than warming up and decaying every round.
    schedule_span: tuple[int, int] = (0, 1)
    # The log of the training rows' label shares, added to the logits the training loss
    # sees (a balanced softmax): a federated client sets it for its local fit
    # (`trainer.federated.balanced_loss`); None trains on the logits as they are.
    label_log_prior: torch.Tensor | None = None

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

    def loss_logits(self, logits: torch.Tensor, split: str) -> torch.Tensor:
        """The logits the loss sees: shifted by `label_log_prior` in training when set, so
        the model learns the classes' scores apart from how often these rows hold each
        (Ren et al. 2020, "Balanced meta-softmax"; under federated label skew, Zhang et
        al. 2022, "Federated learning with label distribution skew via logits
        calibration"). Metrics and the exported model use the logits unshifted."""
        if split != "train" or self.label_log_prior is None:
            return logits
        return logits + self.label_log_prior.to(logits)

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
        groups = parameter_groups(self, self.hparams.weight_decay)
        # Checkpoints from before `optimizer` existed trained with AdamW.
        settings = self.hparams.get("optimizer") or {"name": "adamw"}
        if settings["name"] == "sgd":
            optimizer = torch.optim.SGD(groups, lr=self.hparams.lr,
                                        momentum=settings.get("momentum", 0.0))
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr)
        steps = int(self.trainer.estimated_stepping_batches)
        before, fits = self.schedule_span
        total, offset = steps * fits, steps * before
        warmup = int(self.hparams.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_with_warmup(offset + step, warmup, total))
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}
