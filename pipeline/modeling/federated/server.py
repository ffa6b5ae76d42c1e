"""The federated server's side: Flower's strategy (strategies.py) wrapped
so that a run waits for its clients, goes on without a client that died, records who
took part in each round and validates each round's global model.

The global model is validated on the validation split after every round, as a
centralised fit validates after every epoch; the best round's weights and the last
round's are saved as the Lightning checkpoints the later stages read.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from flwr.common import (
    DisconnectRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetPropertiesIns,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg, Strategy
from flwr.server.strategy.aggregate import aggregate
from omegaconf import DictConfig

from pipeline.modeling.federated.client import load_weights
from pipeline.modeling.federated.control import KEY as CONTROL_KEY
from pipeline.modeling.federated.control import FederationControls
from pipeline.modeling.federated.privacy import ClientLevelPrivacy
from pipeline.modeling.training import monitor_mode


class FederationError(RuntimeError):
    """Too few clients to go on."""


class GlobalModel:
    """The server's copy of the model: each round's averaged weights validated, logged,
    and kept as the best and last checkpoints in `work_dir`."""

    def __init__(self, module: pl.LightningModule, datamodule: pl.LightningDataModule,
                 cfg: DictConfig, work_dir: Path, log_metrics):
        self.module, self.datamodule, self.work_dir = module, datamodule, work_dir
        self.monitor = cfg.train.monitor
        self.sign = -1.0 if monitor_mode(self.monitor) == "min" else 1.0
        self.trainer = pl.Trainer(accelerator=cfg.trainer.accelerator, devices=1,
                                  precision=cfg.trainer.precision, logger=False,
                                  enable_checkpointing=False, enable_progress_bar=False,
                                  enable_model_summary=False)
        self.log_metrics = log_metrics  # (metrics, step): the MLflow run's
        self.best_score: float | None = None
        self.best_round = 0

    def evaluate(self, server_round: int, arrays: list[np.ndarray], config: dict):
        """Flower's server-side evaluation: (loss, metrics) of the global weights."""
        load_weights(self.module.model, arrays)
        (scores,) = self.trainer.validate(self.module, datamodule=self.datamodule,
                                          verbose=False)
        scores = {name: float(value) for name, value in scores.items()}
        self.trainer.save_checkpoint(self.work_dir / "last.ckpt")
        score = scores[self.monitor]
        if self.best_score is None or self.sign * (score - self.best_score) > 0:
            self.best_score, self.best_round = score, server_round
            self.trainer.save_checkpoint(self.work_dir / "best.ckpt")
        return scores.get("val_loss", math.nan), scores


class Tracked(Strategy):
    """A Flower strategy with the run's bookkeeping around it:

    - round 1 waits up to `connect_timeout_s` for every client to connect, so that the
      first round samples from all of them;
    - a round goes ahead with the updates that arrived, from at least `min_clients`
      clients; a client that failed or died is counted, and later rounds sample from
      those still connected;
    - updates are averaged in client order, so the sum is the same whichever finished
      first;
    - with `control_variates` (SCAFFOLD's, control.py), each round's config carries
      c, the average of the connected clients' latest mean steps, and each result its
      client's own;
    - with client-level privacy (`privacy`), the round's weights are its clipped,
      noised average (privacy.py) in place of the strategy's;
    - buffers (`buffers`: positions among the arrays, such as BatchNorm's running
      statistics) are the clients' average whatever the strategy: a server optimiser
      (FedAvgM's momentum) steps weights, and stepping a running variance with
      momentum can drive it negative;
    - each round's participation, training loss and validation scores are recorded
      (`rounds`) and announced on one line with the time left.
    """

    def __init__(self, inner: FedAvg, settings: DictConfig, clients: int, rounds: int,
                 global_model: GlobalModel, buffers: list[int] = (),
                 privacy: ClientLevelPrivacy | None = None, say=print):
        self.inner, self.settings, self.clients, self.rounds = inner, settings, clients, rounds
        self.buffers, self.privacy = list(buffers), privacy
        self.sent: list[np.ndarray] = []  # the global weights the round's clients got
        self.aggregated = 0  # rounds averaged so far (a skipped round is not)
        self.global_model, self.say = global_model, say
        self.rounds_log: list[dict] = []
        self.started = time.perf_counter()
        self.current: dict = {}
        self.controls = (FederationControls() if settings.get("control_variates")
                         else None)

    def __repr__(self) -> str:
        return f"Tracked({self.inner!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        least = int(self.settings.min_clients)
        wanted = self.clients if server_round == 1 else least
        if not client_manager.wait_for(wanted, int(self.settings.connect_timeout_s)):
            if client_manager.num_available() < least:
                raise FederationError(
                    f"federated: {client_manager.num_available()} client(s) connected, "
                    f"fewer than trainer.federated.min_clients={least}")
        if self.privacy is not None:
            self.sent = parameters_to_ndarrays(parameters)
        asked = self.inner.configure_fit(server_round, parameters, client_manager)
        federation = (self.controls.federation(set(client_manager.all()))
                      if self.controls else None)
        if federation is not None:
            for _, fit_ins in asked:
                fit_ins.config[CONTROL_KEY] = federation
        return asked

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict]:
        results = sorted(results, key=lambda pair: int(pair[1].metrics["client"]))
        rows = sum(res.num_examples for _, res in results)
        losses = [(res.num_examples, res.metrics["train_loss"]) for _, res in results]
        self.current = {
            "round": server_round,
            "clients": sorted(int(res.metrics["client"]) for _, res in results),
            "failures": len(failures),
            "rows": rows,
            "steps": sum(int(res.metrics["steps"]) for _, res in results),
            "train_loss": sum(n * loss for n, loss in losses) / rows if rows else math.nan,
        }
        if self.controls is not None:  # the clients keep theirs from a skipped round too
            self.controls.update(results)
        if self.privacy is not None:  # what the clients report goes unnoised: left out
            self.current.update(rows=None, steps=None, train_loss=math.nan)
        if len(results) < int(self.settings.min_clients):
            self.current["skipped"] = True  # the global weights stay as they were
            return None, {}
        if self.privacy is not None:
            return ndarrays_to_parameters(self.privacy.aggregate(
                self.sent, [parameters_to_ndarrays(res.parameters) for _, res in results])), {}
        # The strategy counts the rounds it has averaged: FedAvgM starts its momentum
        # on its first, which a skipped round 1 would otherwise leave it without.
        self.aggregated += 1
        parameters, metrics = self.inner.aggregate_fit(self.aggregated, results, failures)
        self.current.update(metrics)  # FedExP's server_step
        if parameters is not None and self.buffers:
            arrays = parameters_to_ndarrays(parameters)
            averaged = aggregate([(parameters_to_ndarrays(res.parameters), res.num_examples)
                                  for _, res in results])
            for position in self.buffers:
                arrays[position] = averaged[position]
            parameters = ndarrays_to_parameters(arrays)
        return parameters, metrics

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []  # the server validates the global model itself (`evaluate`)

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters):
        if server_round == 0:
            return None  # the starting weights: nothing trained yet
        arrays = parameters_to_ndarrays(parameters)
        if hasattr(self.inner, "handed_on"):  # FedExP's model to hand on may differ
            arrays = self.inner.handed_on(arrays)
        loss, scores = self.global_model.evaluate(server_round, arrays, {})
        record = {**self.current, **scores}
        self.rounds_log.append(record)
        self.global_model.log_metrics(
            {"clients": len(record.get("clients", [])), "client_failures": record["failures"],
             "train_loss": record["train_loss"],
             **{k: record[k] for k in ("server_step",) if k in record}, **scores},
            server_round)
        self.announce(record)
        return loss, scores

    def announce(self, record: dict) -> None:
        done = record["round"]
        elapsed = time.perf_counter() - self.started
        left = elapsed / done * (self.rounds - done)
        monitor = self.global_model.monitor
        failed = f", {record['failures']} failed" if record["failures"] else ""
        skipped = " (too few: round skipped)" if record.get("skipped") else ""
        stepped = (f", server step {record['server_step']:.2f}x the average"
                   if "server_step" in record else "")
        loss = ("" if math.isnan(record["train_loss"])
                else f"train_loss {record['train_loss']:.4f}, ")
        self.say(f"train: federated round {done}/{self.rounds}: {len(record['clients'])} of "
                 f"{self.clients} clients{failed}{skipped}{stepped}, {loss}"
                 f"{monitor} {record[monitor]:.4f}; "
                 f"{elapsed / done:.0f} s per round, about {left:.0f} s left", flush=True)


class InProcessClient(ClientProxy):
    """A client in the server's own process (`mode: simulation`): the server's calls go
    straight to the client, without a network between them."""

    def __init__(self, cid: str, client):
        super().__init__(cid)
        self.client = client.to_client()

    def get_properties(self, ins: GetPropertiesIns, timeout, group_id):
        return self.client.get_properties(ins)

    def get_parameters(self, ins: GetParametersIns, timeout, group_id):
        return self.client.get_parameters(ins)

    def fit(self, ins: FitIns, timeout, group_id) -> FitRes:
        return self.client.fit(ins)

    def evaluate(self, ins, timeout, group_id):
        return self.client.evaluate(ins)

    def reconnect(self, ins, timeout, group_id) -> DisconnectRes:
        return DisconnectRes(reason="")

