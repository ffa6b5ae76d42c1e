"""One federated client: its own training rows, the task's module, and a local
Lightning fit from the global weights each round.

The same client runs inside the train stage's process (`mode: simulation`) or as a
process of its own that talks to the stage's Flower server over gRPC with TLS
(`mode: clients`):

    python -m pipeline.modeling.federated.client --address 127.0.0.1:PORT \
        --partition models/train-work/partitions/client-3.json \
        --root-certificate models/train-work/federation.crt

A client process reads the configuration (params.yaml) and the processed data, keeps
the training rows its partition file lists and drops the rest before it trains.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from flwr.client import NumPyClient
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback

from pipeline import atomic, logs, tasks
from pipeline.config import Paths, load_params
from pipeline.modeling.federated import control


def weights(model: torch.nn.Module) -> list[np.ndarray]:
    """The model's state (parameters and buffers, such as a norm's running statistics)
    as arrays, in the state dict's order, which every copy of the model shares."""
    return [value.detach().cpu().numpy().copy() for value in model.state_dict().values()]


def buffer_positions(model: torch.nn.Module) -> list[int]:
    """Where in `weights`' arrays the buffers are (a norm's running statistics and
    batch count): state the clients measure, not weights a server optimiser steps."""
    trained = {name for name, _ in model.named_parameters()}
    return [i for i, name in enumerate(model.state_dict()) if name not in trained]


def load_weights(model: torch.nn.Module, arrays: list[np.ndarray]) -> None:
    """Set the model's state from `weights`' arrays. An averaged integer buffer (a
    norm's batch count) comes back as a float and is cast to its own type."""
    names = list(model.state_dict())
    if len(names) != len(arrays):
        raise ValueError(f"federated: {len(arrays)} weight arrays for a model with "
                         f"{len(names)} (client and server built different models)")
    state = {name: torch.from_numpy(np.asarray(array)).to(value.dtype)
             for (name, value), array in zip(model.state_dict().items(), arrays, strict=True)}
    model.load_state_dict(state)


def balanced_loss(settings: DictConfig, labelled: bool) -> bool:
    """Whether clients train with the balanced loss: when `trainer.federated` asks for
    it and the task's rows have labels (next-word prediction's have none)."""
    return bool(settings.get("balanced_loss")) and labelled


def label_log_prior(labels: list[int], classes: int) -> torch.Tensor:
    """The log of each class's share of `labels` (a client's training rows), counted
    with one more row of every class: a class the client never sees gets a large
    negative shift rather than minus infinity, so its score still trains."""
    if not labels:
        raise ValueError("trainer.federated.balanced_loss: this client's rows carry no "
                         "labels to take shares of")
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=classes) + 1.0
    return torch.log(torch.as_tensor(counts / counts.sum(), dtype=torch.float32))


class ProximalTerm(Callback):
    """FedProx's proximal term, mu/2 * ||w - w_global||^2, added through its gradient
    mu * (w - w_global) before each optimiser step (to the gradient a mixed-precision
    step has unscaled): the same step as adding it to the loss, without the task's
    loss knowing (Li et al. 2020). It keeps a client whose rows are skewed from
    drifting far from the global model in its local epochs."""

    def __init__(self, mu: float):
        self.mu = mu
        self.anchor: list[torch.Tensor] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.anchor = [p.detach().clone() for p in pl_module.model.parameters()]

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer) -> None:
        for param, anchor in zip(pl_module.model.parameters(), self.anchor, strict=True):
            if param.grad is not None:
                param.grad.add_(param.detach() - anchor, alpha=self.mu)


class CarriedOptimizerState(Callback):
    """A client's optimiser state (AdamW's moment estimates and step count, SGD's
    momentum) carried from the last round it took part in into this one, so each local
    fit does not start from empty estimates: AdamW's first steps from them are about
    the full rate in every weight, whatever its gradient."""

    def __init__(self):
        self.state: dict | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.state is None:
            return
        (optimizer,) = trainer.optimizers
        # the moments from the last round, the hyperparameters (rates) this round's; a
        # copy, which the optimiser steps in place: a round that fails leaves them whole
        optimizer.load_state_dict({"state": copy.deepcopy(self.state),
                                   "param_groups": optimizer.state_dict()["param_groups"]})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        (optimizer,) = trainer.optimizers
        # the optimiser is dropped after the round: its tensors are ours to keep
        self.state = optimizer.state_dict()["state"]


class LocalClient(NumPyClient):
    """A client's side of a round: the global weights in, `local_epochs` of training on
    its rows, its weights, row count and training loss out. Seeded per client and
    round, so a simulated run repeats."""

    def __init__(self, cfg: DictConfig, number: int, datamodule: pl.LightningDataModule,
                 module: pl.LightningModule):
        self.cfg, self.number = cfg, number
        self.datamodule, self.module = datamodule, module
        self.rows = len(datamodule.rows["train"])
        # With `balanced_loss`, the local fit's loss sees the logits shifted by the log
        # of this client's own label shares (ClassifierModule.loss_logits).
        labels = datamodule.train_labels()
        self.log_prior = (label_log_prior(labels, module.hparams.num_classes)
                          if balanced_loss(cfg.trainer.federated, labels is not None)
                          else None)
        self.carried = (CarriedOptimizerState()
                        if cfg.trainer.federated.get("carry_optimizer_state") else None)
        self.controlled = (control.ControlledSteps()
                           if cfg.trainer.federated.get("control_variates") else None)

    def get_parameters(self, config: dict) -> list[np.ndarray]:
        return weights(self.module.model)

    def fit(self, parameters: list[np.ndarray], config: dict):
        load_weights(self.module.model, parameters)
        seed = int(self.cfg.seed) + 1000 * int(config["round"]) + self.number
        pl.seed_everything(seed, workers=True, verbose=False)
        self.datamodule.seed = seed  # a new order of its rows every round
        mu = float(config.get("proximal_mu") or 0.0)
        # This round's local fit is one of the run's `rounds` in its learning-rate
        # schedule: warm-up once at the start, decay to the end of the last round.
        self.module.schedule_span = ((int(config["round"]) - 1, int(config["rounds"]))
                                     if "rounds" in config else (0, 1))
        trainer = pl.Trainer(
            accelerator=self.cfg.trainer.accelerator, devices=1,
            precision=self.cfg.trainer.precision,
            max_epochs=int(config["local_epochs"]),
            limit_train_batches=self.cfg.train.limit_train_batches,
            limit_val_batches=0, num_sanity_val_steps=0,  # the server validates
            gradient_clip_val=self.cfg.train.gradient_clip_val,
            callbacks=[*([self.controlled] if self.controlled else []),
                       *([ProximalTerm(mu)] if mu > 0 else []),
                       *([self.carried] if self.carried else [])],
            logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False,
        )
        self.module.label_log_prior = self.log_prior
        if self.controlled:
            self.controlled.receive(config.get(control.KEY))
        try:
            trainer.fit(self.module, train_dataloaders=self.datamodule.train_dataloader())
        finally:
            self.module.label_log_prior = None  # the module may be shared (simulation)
        loss = trainer.callback_metrics.get("train_loss")
        metrics = {"client": self.number, "steps": int(trainer.global_step),
                   "train_loss": float(loss) if loss is not None else float("nan"),
                   **(self.controlled.report() if self.controlled else {})}
        return weights(self.module.model), self.rows, metrics


def build(cfg: DictConfig, paths: Paths, number: int, rows: list[int],
          datamodule: pl.LightningDataModule | None = None,
          module: pl.LightningModule | None = None) -> LocalClient:
    """Client `number` holding training rows `rows`. In one process the clients share
    the loaded splits (`datamodule`, which each narrows to its own rows on a shallow
    copy) and one module, since they train one after another."""
    task = tasks.from_config(cfg)
    if datamodule is None:
        datamodule = task.datamodule(cfg, paths)
        datamodule.setup("fit")
    own = datamodule.with_train_rows(rows)
    return LocalClient(cfg, number, own, module or task.module(cfg, paths))


def main() -> None:
    from flwr.client import start_client

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="the Flower server, host:port")
    parser.add_argument("--partition", required=True,
                        help="this client's partition file (its number and rows)")
    parser.add_argument("--root-certificate", required=True,
                        help="the server's certificate (PEM), the one root this client "
                             "trusts (tls.py)")
    parser.add_argument("--threads", type=int, default=1, help="torch's CPU threads")
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    args = parser.parse_args()
    logs.quiet()
    torch.set_num_threads(args.threads)
    mine = atomic.read_json(args.partition)
    client = build(load_params(), Paths(), int(mine["client"]), mine["rows"])
    start_client(server_address=args.address, client=client.to_client(),
                 root_certificates=Path(args.root_certificate).read_bytes(),
                 max_wait_time=args.connect_timeout)


if __name__ == "__main__":
    main()
