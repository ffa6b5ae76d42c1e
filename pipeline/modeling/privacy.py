"""Differentially private training (DP-SGD with Opacus) inside the shared Lightning loop,
for any task whose model Opacus can take per-example gradients of.

`train.privacy.enabled` (conf/config.yaml) makes three changes to a fit, and nothing
else in the task or the stages:
- batches are drawn by Poisson sampling (each training row joins a step with
  probability batch_size / rows, so batch sizes vary and a batch may be empty), as the
  privacy analysis assumes (`PoissonSampling`);
- every example's gradient is clipped to `max_grad_norm` and Gaussian noise of
  `noise_multiplier x max_grad_norm` is added to their sum before the optimiser's step
  (Opacus's DPOptimizer around the task's own optimiser; its schedule is untouched);
- an accountant (`accountant`: prv, rdp or gdp) counts the privacy spent step by step.
  The noise multiplier is the smallest that keeps `max_epochs` epochs within the target
  `epsilon` at `delta` (null: 1 / (10 x training rows), well under 1/n).

`DifferentialPrivacy` keeps its state (the accountant's history, and epsilon so far) in
every checkpoint, so a resumed fit goes on counting where it stopped. The checkpoints
the fit leaves carry the whole fit's epsilon (training.py `finish`): the best one was
chosen after every later epoch ran, so its weights owe them too. Evaluate reports it
(pipeline/tracking/privacy.py `spent`). Early stopping spends less than the target.
The noise and the batches come from the operating system's randomness, not `seed`
(`secret_generator`), and the noise is drawn in Opacus's secure mode. Pruning,
distillation and gradient accumulation are refused with privacy (`check_settings`).

Per-example gradients come from Opacus's hooks on the model's own layers (Linear,
Embedding, LayerNorm, GroupNorm, convolutions; other modules through functorch), so the
model stays the task's model, its state dict and export unchanged. BatchNorm mixes
examples and cannot be private: a model with it is refused, naming the setting that
replaces it (`model.norm=group`). An nn.LSTM runs as Opacus's DPLSTM for the fit
(`private_layers`): the same weights under the same names, so checkpoints, export and
the service see an nn.LSTM's state dict. Lightning's gradient-norm clipping is off in a
private fit, since clipping is per example here.
"""

from __future__ import annotations

import secrets
from functools import partial

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.lightning import DPLightningDataModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from opacus.validators.lstm import fix as dp_lstm
from pytorch_lightning.callbacks import Callback

from pipeline.tracking.privacy import STATE_KEY


class PrivacyError(ValueError):
    """A private fit that cannot be run as configured; the message says why."""


def enabled(cfg: DictConfig) -> bool:
    privacy = cfg.train.get("privacy")
    return bool(privacy and privacy.get("enabled"))


def secret_generator() -> torch.Generator:
    """A generator seeded from the operating system's randomness. The noise and the
    batches of a private fit must not follow `seed`: it is in params.yaml and MLflow,
    and whoever knows it could replay the noise and subtract it. So a private fit
    does not repeat bit for bit, and a resumed one draws afresh."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def check_settings(cfg: DictConfig, distilling: bool) -> None:
    """PrivacyError for what a private fit cannot account for."""
    prune = cfg.train.get("prune") or {}
    if any(prune.get(key) is not None for key in ("heads", "d_ff", "channels")):
        raise PrivacyError("train.privacy with train.prune: the pruned model's fine-tune "
                           "would spend a budget of its own, which is not counted; "
                           "prune without privacy, or train privately without pruning")
    if distilling:
        raise PrivacyError("train.privacy with distillation (distill.teacher): the "
                           "teacher learns from the training split without privacy, and "
                           "its logits on augmented copies would carry it to the student")
    if int(cfg.trainer.get("accumulate_grad_batches") or 1) != 1:
        raise PrivacyError("train.privacy with trainer.accumulate_grad_batches: one noisy "
                           "step over several Poisson batches is not what the accountant "
                           "counts; raise train.batch_size instead")


def public_parts(cfg: DictConfig) -> list[str]:
    """What a private fit of `cfg` starts from that is public, not learnt from the
    training rows: pre-trained token embeddings (which `DifferentialPrivacy` freezes
    when `freeze_embeddings` says so) and a frozen pre-trained encoder. The model card
    names them."""
    public = ([f"token embeddings of {cfg.train.init_embeddings}"]
              if cfg.train.get("init_embeddings") else [])
    if cfg.model.get("freeze_encoder"):
        public.append(f"the pre-trained encoder {cfg.model.path} (frozen)")
    return public


def target_delta(privacy: DictConfig, rows: int) -> float:
    return float(privacy.delta) if privacy.get("delta") else 1.0 / (10 * rows)


class PoissonSampling(DPLightningDataModule):
    """The task's datamodule with Poisson-sampled training batches at the rate of its
    batch size, drawn from secret randomness (`secret_generator`): Opacus's
    DPDataLoader over the task's own loader, or the datamodule's
    `poisson_train_dataloader(sample_rate, seed)` where its loader yields whole batches
    (images). Either loader has `sample_rate`."""

    def __init__(self, datamodule: pl.LightningDataModule):
        super().__init__(datamodule, generator=secret_generator())

    def train_dataloader(self):
        plain = self.datamodule.train_dataloader()
        if hasattr(self.datamodule, "poisson_train_dataloader"):
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            return self.datamodule.poisson_train_dataloader(1 / len(plain), seed)
        return DPDataLoader.from_data_loader(plain, generator=self.generator)


def check_model(model: torch.nn.Module) -> None:
    """PrivacyError naming what Opacus cannot train privately, and the way out."""
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        said = " ".join(str(p) for p in problems)
        hint = (" (set model.norm=group: GroupNorm in place of BatchNorm)"
                if "BatchNorm" in said else "")
        raise PrivacyError(f"train.privacy: this model cannot be trained with "
                           f"differential privacy: {problems[0]}{hint}")


def private_layers(model: torch.nn.Module) -> list[str]:
    """Swap each nn.LSTM in `model` for Opacus's DPLSTM (whose per-example gradients
    Opacus's hooks can take; nn.LSTM's fused kernel hides them), weights copied.
    Returns the swapped modules' names.

    A DPLSTM keeps its weights in cells (`l0.ih.weight`) and shows them under
    nn.LSTM's names (`weight_ih_l0`), but only as the top module: inside a model both
    names reach the state dict. The hooks below keep nn.LSTM's names alone in it, so a
    checkpoint loads into the task's own model, and give the cells their weights back
    when a resumed fit loads one."""
    swapped = {}
    for name, layer in list(model.named_modules()):
        if isinstance(layer, torch.nn.LSTM):
            private = dp_lstm(layer)
            private.register_load_state_dict_pre_hook(_cells_from_lstm_names)
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, private)
            swapped[name] = private
    if swapped:
        model.register_state_dict_post_hook(partial(_lstm_names_only, swapped))
    return list(swapped)


def _lstm_names_only(swapped: dict, model, state_dict, prefix, local_metadata) -> None:
    for name, layer in swapped.items():
        for internal in layer.old_to_new:
            state_dict.pop(f"{prefix}{name}.{internal}", None)


def _cells_from_lstm_names(layer, state_dict, prefix, *args) -> None:
    for internal, public in layer.old_to_new.items():
        if prefix + public in state_dict:
            state_dict.setdefault(prefix + internal, state_dict[prefix + public])


class DifferentialPrivacy(Callback):
    """DP-SGD for one fit: wraps the optimiser, counts the privacy spent, logs epsilon
    per epoch and keeps the accountant in checkpoints."""

    def __init__(self, privacy: DictConfig, epochs: int, public: list[str] = ()):
        """`public`: what the model starts from that is not covered (pre-trained
        weights are public data), named on the model card."""
        self.settings = privacy
        self.epochs = epochs
        self.public = list(public)
        self.accountant = create_accountant(mechanism=str(privacy.accountant))
        self.restored: dict | None = None
        self.frozen: list[str] = []
        self.swapped: list[str] = []
        self.facts: dict = {}
        self.hooks: GradSampleModule | None = None

    @property
    def state_key(self) -> str:
        return STATE_KEY

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before the optimiser exists: freeze the token embedding table when asked and
        it started from public embeddings (train.init_embeddings fills
        `model.embedding`; text's MiniLM start). Its
        per-example gradients are a vocabulary x width table per example (30,522 x 128
        for text's MiniLM vocabulary), which made private training 19.7 times slower
        than plain, 4.1 times frozen (bench/bench_privacy.py); a frozen table started from
        public embeddings is a fixed feature, and DP learns better on good fixed
        features (Tramer & Boneh 2021). And swap nn.LSTMs for DPLSTMs
        (`private_layers`)."""
        self.swapped = private_layers(pl_module.model)
        table = getattr(pl_module.model, "embedding", None)
        if not (self.settings.get("freeze_embeddings") and self.public
                and isinstance(table, torch.nn.Embedding)):
            return  # nothing public to keep: a table trained from scratch learns
        table.requires_grad_(False)
        self.frozen = ["embedding"]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            raise PrivacyError("train.privacy: private training runs on one device; "
                               "this fit has several (trainer.devices, num_nodes)")
        loader = trainer.train_dataloader
        if getattr(loader, "sample_rate", None) is None:
            raise PrivacyError("train.privacy: the training batches are not Poisson-"
                               "sampled (fit the datamodule through PoissonSampling)")
        check_model(pl_module.model)
        rows, sample_rate = len(loader.dataset), loader.sample_rate
        delta = target_delta(self.settings, rows)
        steps = self.epochs * len(loader)  # the steps the fit will take, exactly
        noise = get_noise_multiplier(target_epsilon=float(self.settings.epsilon),
                                     target_delta=delta, sample_rate=sample_rate,
                                     steps=steps, accountant=self.accountant.mechanism())
        if self.restored is not None:  # a resumed fit: the steps already taken count
            self.accountant.load_state_dict(self.restored["accountant_state"])
        # hooks on the model's layers; the module keeps calling its model directly
        self.hooks = GradSampleModule(pl_module.model)
        (optimizer,) = trainer.strategy.optimizers
        # noise from secret randomness, drawn the way that resists floating-point
        # attacks on the Gaussian sampler (Opacus's secure mode)
        private = DPOptimizer(optimizer, noise_multiplier=noise,
                              max_grad_norm=float(self.settings.max_grad_norm),
                              expected_batch_size=max(1, round(sample_rate * rows)),
                              generator=secret_generator(), secure_mode=True)
        private.attach_step_hook(self.accountant.get_optimizer_hook_fn(
            sample_rate=sample_rate))
        trainer.strategy.optimizers = [private]
        self.facts = {"accountant": self.accountant.mechanism(), "delta": delta,
                      "target_epsilon": float(self.settings.epsilon),
                      "noise_multiplier": noise,
                      "max_grad_norm": float(self.settings.max_grad_norm),
                      "sample_rate": sample_rate, "rows": rows, "public": self.public,
                      "frozen": self.frozen, "as_dplstm": self.swapped}
        print(f"train: differentially private: noise multiplier {noise:.3f} for epsilon "
              f"{self.settings.epsilon} at delta {delta:.2e} over {self.epochs} epochs "
              f"(sample rate {sample_rate:.5f}, {self.accountant.mechanism()} accountant)",
              flush=True)

    def epsilon(self) -> float:
        """The privacy spent so far (0 before the first step)."""
        if not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(self.facts["delta"]))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("epsilon", self.epsilon())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.hooks is not None:  # the model goes on (export, pruning) without them
            self.hooks.remove_hooks()

    def state_dict(self) -> dict:
        steps = sum(n for _, _, n in self.accountant.history)
        return {"accountant_state": self.accountant.state_dict(), **self.facts,
                "steps": steps, "epsilon": self.epsilon() if self.facts else 0.0}

    def load_state_dict(self, state_dict: dict) -> None:
        self.restored = state_dict
