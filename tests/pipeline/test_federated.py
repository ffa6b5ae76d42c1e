"""Federated training (trainer=federated): partitions, FedAvg and FedProx rounds in one
process and across real client processes, a client killed mid-run, and the result
handed to evaluate as a centralised fit's is."""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections import Counter
from types import SimpleNamespace

import grpc
import mlflow
import numpy as np
import psutil
import pytest
import pytorch_lightning as pl
import torch
from conftest import compose, publicly_seeded, restored_tracking_uri
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from omegaconf import OmegaConf
from opacus.accountants import create_accountant
from pytorch_lightning.callbacks import Callback
from test_scale import start_training, train_dir
from torch.utils.data import DataLoader

from pipeline.config import Paths
from pipeline.modeling.federated.client import (
    CarriedOptimizerState,
    LocalClient,
    ProximalTerm,
    label_log_prior,
)
from pipeline.modeling.federated.client import weights as local_weights
from pipeline.modeling.federated.partition import PartitionError, partition
from pipeline.modeling.federated.privacy import ClientLevelPrivacy
from pipeline.modeling.federated.run import check_settings, fit
from pipeline.modeling.federated.server import Tracked
from pipeline.modeling.federated.strategies import strategy
from pipeline.stages.evaluate import evaluate
from pipeline.tasks.image_classification.classifier import ImageClassifier
from pipeline.tasks.text_classification.inference import load_module
from pipeline.tracking import privacy


def settings(**values):
    return OmegaConf.create({"by": "dirichlet", "alpha": 0.5, **values})


def federated(*overrides: str) -> list[str]:
    """The overrides that make a fit federated, the trainer group's own first."""
    trainer = OmegaConf.to_container(compose("trainer=federated").trainer)
    flat = [f"trainer.{k}={v}" for k, v in trainer.items() if k != "federated"]
    inner = [f"trainer.federated.{k}={v}" for k, v in trainer["federated"].items()
             if k not in ("partition", "privacy")]
    inner += [f"trainer.federated.privacy.{k}={'null' if v is None else v}"
              for k, v in trainer["federated"]["privacy"].items()]
    return [*flat, *inner, "trainer.federated.partition.by=iid",
            "trainer.federated.partition.alpha=0.5", "train.batch_size=16", *overrides]


def test_every_row_goes_to_exactly_one_client_and_alpha_sets_the_skew():
    labels = np.random.default_rng(0).integers(0, 4, 4000).tolist()

    def skew(alpha):
        parts = partition(settings(alpha=alpha), 10, labels, None, len(labels), seed=7)
        assert sorted(i for part in parts for i in part) == list(range(len(labels)))
        assert parts == partition(settings(alpha=alpha), 10, labels, None, len(labels), 7)
        # the share of each client's rows that its most common label takes
        return np.mean([Counter(labels[i] for i in p).most_common(1)[0][1] / len(p)
                        for p in parts])

    assert skew(0.1) > 0.7 and skew(100) < 0.35  # 4 balanced labels: 0.25 when iid
    iid = partition(settings(by="iid"), 3, None, None, 10, seed=0)
    assert sorted(map(len, iid)) == [3, 3, 4]


def test_groups_stay_whole_on_one_client_and_impossible_partitions_are_named():
    groups = [f"user{i % 7}" for i in range(70)]
    parts = partition(settings(by="group"), 3, None, groups, 70, seed=0)
    owners = {g: {c for c, part in enumerate(parts) for i in part if groups[i] == g}
              for g in set(groups)}
    assert all(len(owner) == 1 for owner in owners.values())
    with pytest.raises(PartitionError, match="7 group"):
        partition(settings(by="group"), 8, None, groups, 70, seed=0)
    with pytest.raises(PartitionError, match="data.group_column"):
        partition(settings(by="group"), 3, None, None, 70, seed=0)
    with pytest.raises(PartitionError, match="no labels|have none"):
        partition(settings(), 3, None, None, 70, seed=0)


def test_the_proximal_term_pulls_each_weight_back_toward_the_global_model():
    layer = torch.nn.Linear(3, 1)
    module = torch.nn.Module()
    module.model = layer
    term = ProximalTerm(mu=0.5)
    term.on_train_start(None, module)
    with torch.no_grad():
        layer.weight += 2.0  # drifted from the global weights
    layer.weight.grad = torch.zeros_like(layer.weight)
    layer.bias.grad = torch.zeros_like(layer.bias)
    term.on_before_optimizer_step(None, module, None)
    assert torch.allclose(layer.weight.grad, torch.full_like(layer.weight, 1.0))  # 0.5 * 2
    assert torch.equal(layer.bias.grad, torch.zeros_like(layer.bias))


def test_a_clients_label_shares_become_a_finite_log_prior_over_every_class():
    prior = label_log_prior([0, 0, 0, 1], classes=3)  # class 2: none of its rows
    assert torch.exp(prior).tolist() == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    with pytest.raises(ValueError, match="balanced_loss"):
        label_log_prior([], classes=3)


def scores_after_fitting_skewed_labels(log_prior: torch.Tensor | None) -> list[float]:
    """Class probabilities a tiny image classifier gives a blank image after training
    on blank images labelled 0 nine times in ten: all it can learn is how often each
    label comes."""
    with publicly_seeded(0):
        module = ImageClassifier({"name": "mlp", "hidden": [4]}, 1, 2, 2, 2, ["a", "b"])
    module.label_log_prior = log_prior
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    batch = {"pixels": torch.zeros(10, 1, 2, 2), "labels": torch.tensor([0] * 9 + [1])}
    for _ in range(300):
        optimizer.zero_grad()
        module._step(batch, "train").backward()
        optimizer.step()
    with torch.no_grad():
        return module(batch["pixels"][:1]).softmax(-1)[0].tolist()


def test_a_balanced_loss_learns_the_classes_not_how_often_a_client_holds_each():
    assert scores_after_fitting_skewed_labels(None) == pytest.approx([0.9, 0.1], abs=0.02)
    # the shares of a client holding 1,000 rows, nine in ten labelled 0
    balanced = scores_after_fitting_skewed_labels(label_log_prior([0] * 900 + [1] * 100, 2))
    assert balanced == pytest.approx([0.5, 0.5], abs=0.05)


def learning_rates(span: tuple[int, int], steps: int) -> list[float]:
    """The learning rates of a fit of `steps` optimiser steps that is `span` of a run."""
    module = ImageClassifier({"name": "mlp", "hidden": [4]}, 1, 4, 4, 2, ["a", "b"],
                             lr=1.0, warmup_ratio=0.25)
    module.schedule_span = span
    module.trainer = SimpleNamespace(estimated_stepping_batches=steps)
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


def test_each_round_steps_through_its_share_of_the_whole_runs_schedule():
    """Four rounds of five local steps warm up once and decay once, as one fit of
    twenty steps does, instead of warming up and decaying every round."""
    whole = learning_rates((0, 1), 20)
    rounds = [rate for r in range(4) for rate in learning_rates((r, 4), 5)]
    assert rounds == pytest.approx(whole)
    assert whole[0] == 0.0 and max(whole) == pytest.approx(1.0) and whole[-1] < 0.05
    assert learning_rates((3, 4), 5)[0] < 0.5  # the last round starts low, not warm


class Rates(Callback):
    """The learning rate of every optimiser step a fit takes."""

    def __init__(self):
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def two_rounds(carried: CarriedOptimizerState | None) -> tuple[int, list[float]]:
    """Two local fits of three and then two AdamW steps, as one client's two rounds (a
    round's schedule spans its own steps): the step count AdamW's state holds at the
    end, and every step's learning rate."""
    with publicly_seeded(0):
        module = ImageClassifier({"name": "mlp", "hidden": [4]}, 1, 4, 4, 2, ["a", "b"],
                                 lr=0.01, warmup_ratio=0.0)
    rows = [{"pixels": torch.rand(1, 4, 4), "labels": torch.tensor(i % 2)} for i in range(6)]
    rates = Rates()
    for number in range(2):
        module.schedule_span = (number, 2)
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                             callbacks=[rates, *([carried] if carried else [])],
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)
        trainer.fit(module, train_dataloaders=DataLoader(rows[:6 - 2 * number],
                                                         batch_size=2))
    (state, *_) = trainer.optimizers[0].state_dict()["state"].values()
    return int(state["step"]), rates.seen


def test_a_carried_optimiser_state_goes_on_from_the_clients_last_round():
    assert two_rounds(None)[0] == 2  # afresh: this round's two steps only
    carried_steps, carried_rates = two_rounds(CarriedOptimizerState())
    assert carried_steps == 5
    # the moments carry over, the learning rates stay the run's schedule
    assert carried_rates == pytest.approx(two_rounds(None)[1])
    assert carried_rates[3] < carried_rates[0]


class FailsAfterOneStep(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        raise RuntimeError("the client's round broke")


def test_a_client_carries_its_optimiser_state_when_told_and_a_failed_round_leaves_it():
    """A LocalClient's rounds with `carry_optimizer_state`: AdamW's step count goes on
    from round to round; a round that breaks part-way leaves the carried state as the
    last whole round left it."""
    def client(carry: bool) -> LocalClient:
        cfg = OmegaConf.create({
            "seed": 0, "trainer": {"accelerator": "cpu", "precision": "32-true",
                                   "federated": {"carry_optimizer_state": carry}},
            "train": {"limit_train_batches": 1.0, "gradient_clip_val": 1.0}})
        rows = [{"pixels": torch.rand(1, 4, 4), "labels": torch.tensor(i % 2)}
                for i in range(6)]
        datamodule = SimpleNamespace(rows={"train": rows}, seed=0, train_labels=lambda: None,
                                     train_dataloader=lambda: DataLoader(rows, batch_size=2))
        with publicly_seeded(0):
            module = ImageClassifier({"name": "mlp", "hidden": [4]}, 1, 4, 4, 2,
                                     ["a", "b"], lr=0.01)
        return LocalClient(cfg, 0, datamodule, module)

    assert client(False).carried is None
    carrying = client(True)
    with publicly_seeded(0):  # a client's fit seeds the process: put the states back
        for number in (1, 2):
            carrying.fit(local_weights(carrying.module.model),
                         {"round": number, "rounds": 3, "local_epochs": 1})
    assert [int(s["step"]) for s in carrying.carried.state.values()] == [6] * 4
    broken = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                        callbacks=[carrying.carried, FailsAfterOneStep()],
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(RuntimeError, match="round broke"):
        broken.fit(carrying.module, train_dataloaders=carrying.datamodule.train_dataloader())
    assert [int(s["step"]) for s in carrying.carried.state.values()] == [6] * 4


class Broken:
    """A strategy whose run fails at once, before any round."""

    def initialize_parameters(self, client_manager):
        raise RuntimeError("the strategy broke")


def test_a_failing_run_with_real_clients_closes_the_servers_port(tmp_path, monkeypatch):
    """When a round raises, the Flower server stops too: its port is free again and
    the stage's error is the one the run raised."""
    from pipeline.modeling.federated import run

    port = run.free_port()
    monkeypatch.setattr(run, "free_port", lambda: port)

    with pytest.raises(RuntimeError, match="the strategy broke"):
        run.with_clients(Broken(), OmegaConf.create({"round_timeout_s": 5,
                                                     "connect_timeout_s": 5}),
                         1, [], tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # OSError while a server still listens


def test_the_federation_server_speaks_tls_only_to_clients_that_trust_its_certificate():
    """Model updates never travel in plaintext: the run's gRPC server completes a TLS
    handshake with a client trusting its certificate, and none with a plaintext client
    or one trusting another certificate."""
    from flwr.server import SimpleClientManager
    from flwr.server.superlink.fleet.grpc_bidi.grpc_server import start_grpc_server

    from pipeline.modeling.federated import run, tls

    certificate, key = tls.run_certificate()
    address = f"{tls.HOST}:{run.free_port()}"
    server = start_grpc_server(client_manager=SimpleClientManager(), server_address=address,
                               certificates=tls.server_certificates(certificate, key))
    try:
        trusting = grpc.secure_channel(address, grpc.ssl_channel_credentials(certificate))
        grpc.channel_ready_future(trusting).result(timeout=10)
        trusting.close()
        another, _ = tls.run_certificate()
        for channel in (grpc.insecure_channel(address),
                        grpc.secure_channel(address, grpc.ssl_channel_credentials(another))):
            with pytest.raises(grpc.FutureTimeoutError):
                grpc.channel_ready_future(channel).result(timeout=3)
            channel.close()
    finally:
        server.stop(None).wait()


def test_real_clients_trust_the_certificate_their_server_serves(tmp_path, monkeypatch):
    from pipeline.modeling.federated import run

    served = {}

    def recording(**settings):
        served.update(settings)
        return start_grpc_server(**settings)

    launched = []

    class Launched:  # a client process, recorded instead of started
        def __init__(self, args, **options):
            launched.append(args)

        def poll(self):
            return 0

        def wait(self, timeout=None):
            return 0

    start_grpc_server = run.start_grpc_server
    monkeypatch.setattr(run, "start_grpc_server", recording)
    monkeypatch.setattr(run.subprocess, "Popen", Launched)
    with pytest.raises(RuntimeError, match="the strategy broke"):
        run.with_clients(Broken(), OmegaConf.create({"round_timeout_s": 5,
                                                     "connect_timeout_s": 5}),
                         1, [[0, 1]], tmp_path)
    _, certificate, _ = served["certificates"]
    assert (tmp_path / "federation.crt").read_bytes() == certificate
    (args,) = launched  # the client is told to trust that file, and only it
    assert args[args.index("--root-certificate") + 1] == str(tmp_path / "federation.crt")


def test_fedavgm_puts_momentum_on_the_servers_step_and_unknown_strategies_are_named():
    chosen = strategy(settings(strategy="fedavgm", server_lr=0.5, server_momentum=0.9,
                               fraction_fit=1.0, min_clients=2), [np.zeros(3)], 1, 4)
    assert type(chosen).__name__ == "FedAvgM"
    assert (chosen.server_learning_rate, chosen.server_momentum) == (0.5, 0.9)
    with pytest.raises(ValueError, match="unknown strategy 'fednova' "
                                         "\\(fedavg, fedavgm, fedprox, fedexp\\)"):
        strategy(settings(strategy="fednova", fraction_fit=1.0, min_clients=2),
                 [np.zeros(3)], 1, 4)


def fit_result(client: int, rows: int, arrays: list[np.ndarray]) -> tuple[None, FitRes]:
    return None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), rows,
                        {"client": client, "steps": 1, "train_loss": 0.5})


def test_server_momentum_steps_the_weights_and_leaves_norm_statistics_averaged():
    """FedAvgM's momentum on a BatchNorm's running variance drove it negative (every
    validation answer the same); the statistics stay the clients' weighted average."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    start = [value.numpy().astype(np.float64) for value in model.state_dict().values()]
    names = list(model.state_dict())
    buffers = [names.index(n) for n in ("1.running_mean", "1.running_var",
                                        "1.num_batches_tracked")]
    inner = strategy(settings(strategy="fedavgm", server_lr=1.0, server_momentum=0.9,
                              fraction_fit=1.0, min_clients=2), start, 1, 3)
    tracked = Tracked(inner, settings(min_clients=2), 2, 3, global_model=None,
                      buffers=buffers)
    current = start
    # round 1 hears from one client, under min_clients: skipped, and momentum starts
    # with the first round averaged (FedAvgM asserted it had some from round 2 on)
    assert tracked.aggregate_fit(1, [fit_result(0, 1, start)], [])[0] is None
    for server_round in (2, 3, 4):  # both clients move every array down by 1 and 3
        results = [fit_result(0, 1, [a - 1.0 for a in current]),
                   fit_result(1, 3, [a - 3.0 for a in current])]
        parameters, _ = tracked.aggregate_fit(server_round, results, [])
        stepped = parameters_to_ndarrays(parameters)
        for position, (before, after) in enumerate(zip(current, stepped, strict=True)):
            if position in buffers:  # the clients' average: 2.5 down each round
                assert np.allclose(after, before - 2.5)
            elif server_round == 2:  # momentum starts as the first average's step
                assert np.allclose(after, before - 2.5)
            else:  # then carries the earlier steps: further than the average's 2.5
                assert (after < before - 2.5).all()
        current = stepped


class AllConnected:
    """A client manager whose clients are all there (configure_fit asks no one here)."""

    def wait_for(self, wanted: int, timeout: int) -> bool:
        return True

    def num_available(self) -> int:
        return 3

    def sample(self, num_clients: int, min_num_clients: int | None = None, criterion=None):
        return []


def test_fedexp_steps_past_the_average_as_far_as_the_clients_disagree():
    """FedExP's step: max(1, sum p_i ||d_i||^2 / (2 ||sum p_i d_i||^2)) times the
    average update (p_i: a client's share of the rows), from the weights the round
    started at, over weights only; a norm's statistics are averaged and do not count."""
    inner = strategy(settings(strategy="fedexp", fraction_fit=1.0, min_clients=2,
                              extrapolation_epsilon=1e-9), [np.zeros(3), np.zeros(1)],
                     1, 2, buffers=[1])
    tracked = Tracked(inner, settings(min_clients=2, connect_timeout_s=1), 3, 3,
                      global_model=None, buffers=[1])

    def round_of(number: int, start: list[np.ndarray], updates: list[np.ndarray],
                 rows: list[int]) -> list[np.ndarray]:
        tracked.configure_fit(number, ndarrays_to_parameters(start), AllConnected())
        results = [fit_result(i, n, [start[0] + update, start[1] + 10.0 * (i + 1)])
                   for i, (update, n) in enumerate(zip(updates, rows, strict=True))]
        parameters, _ = tracked.aggregate_fit(number, results, [])
        return parameters_to_ndarrays(parameters)

    # three clients, each along its own axis (4, 4 and 2 long), holding 1, 1 and 2
    # shares of the rows: the average (1, 1, 1) is shorter than any of them; the step
    # (16/4 + 16/4 + 4/2) / (2 * 3) = 5/3 (with the clients weighed alike it would be 2)
    start = [np.full(3, 5.0), np.zeros(1)]
    updates = [4.0 * np.eye(3)[0], 4.0 * np.eye(3)[1], 2.0 * np.eye(3)[2]]
    weights, buffer = round_of(1, start, updates, [1, 1, 2])
    assert tracked.current["server_step"] == pytest.approx(5 / 3)
    assert np.allclose(weights, 5.0 + 5 / 3)
    assert np.allclose(buffer, 22.5)  # the clients' average by rows, not stepped
    # the same updates from where round 1 left the weights step from there
    weights, buffer = round_of(2, [weights, buffer], updates, [1, 1, 2])
    assert np.allclose(weights, 5.0 + 10 / 3)
    # clients that agree: the plain average
    weights, _ = round_of(3, [weights, buffer], [np.array([1.0, 2.0, 3.0])] * 3, [1, 1, 2])
    assert np.allclose(weights, 5.0 + 10 / 3 + np.array([1.0, 2.0, 3.0]))
    assert tracked.current["server_step"] == 1.0
    with pytest.raises(ValueError, match="extrapolation_epsilon must be above 0"):
        strategy(settings(strategy="fedexp", fraction_fit=1.0, min_clients=2,
                          extrapolation_epsilon=0.0), [np.zeros(3)], 1, 2)


def test_fedexp_can_hand_on_the_average_of_its_last_two_models():
    """With average_last_two the model validated and handed on is halfway between the
    round's start and its stretched step (buffers as the round left them); the next
    round's clients still start from the stretched step."""
    class Validated:
        def __init__(self):
            self.seen = []

        def evaluate(self, server_round, arrays, config):
            self.seen.append(arrays)
            return 0.0, {"val_acc": 0.5}

        def log_metrics(self, metrics, step):
            pass

        monitor = "val_acc"

    start = [np.full(3, 5.0), np.zeros(1)]
    inner = strategy(settings(strategy="fedexp", fraction_fit=1.0, min_clients=2,
                              extrapolation_epsilon=1e-9, average_last_two=True),
                     start, 1, 2, buffers=[1])
    validated = Validated()
    tracked = Tracked(inner, settings(min_clients=2, connect_timeout_s=1), 3, 2,
                      global_model=validated, buffers=[1], say=lambda *a, **k: None)
    tracked.configure_fit(1, ndarrays_to_parameters(start), AllConnected())
    updates = [4.0 * np.eye(3)[0], 4.0 * np.eye(3)[1], 2.0 * np.eye(3)[2]]
    results = [fit_result(i, n, [start[0] + update, start[1] + 4.0])
               for i, (update, n) in enumerate(zip(updates, [1, 1, 2], strict=True))]
    parameters, _ = tracked.aggregate_fit(1, results, [])
    stepped = parameters_to_ndarrays(parameters)
    assert np.allclose(stepped[0], 5.0 + 5 / 3)  # what the next round's clients get
    tracked.evaluate(1, parameters)
    # a round with too few clients is skipped: the global weights and the model handed
    # on stay as they were
    tracked.configure_fit(2, parameters, AllConnected())
    assert tracked.aggregate_fit(2, results[:1], [])[0] is None
    tracked.evaluate(2, parameters)
    for weights, buffer in validated.seen:
        assert np.allclose(weights, 5.0 + 5 / 6) and np.allclose(buffer, 4.0)
    assert len(validated.seen) == 2


@pytest.mark.parametrize("strategy, balanced, controlled",
                         [("fedavg", False, False), ("fedexp", False, True),
                          ("fedprox", True, False)])
def test_a_simulated_federation_hands_evaluate_a_model_as_a_central_fit_does(
        workspace, tmp_path, strategy, balanced, controlled):
    cfg = train_dir(workspace, tmp_path, *federated(
        "trainer.federated.clients=3", "trainer.federated.rounds=3",
        f"trainer.federated.strategy={strategy}", "trainer.federated.proximal_mu=0.1",
        f"trainer.federated.balanced_loss={balanced}",
        f"trainer.federated.control_variates={controlled}"))
    with restored_tracking_uri():
        report = fit(cfg, Paths(tmp_path))
        metrics, _ = evaluate(cfg, Paths(tmp_path))
    rounds = report["federated"]["rounds"]
    assert [r["clients"] for r in rounds] == [[0, 1, 2]] * 3
    assert sum(c["rows"] for c in report["federated"]["clients_rows"]) == report["train_rows"]
    assert report["epochs"] == 3 and report["global_step"] > 0
    # the synthetic task is learnable: the averaged model learned it
    assert metrics["accuracy"] > 0.75, metrics
    module = load_module(tmp_path / "models/checkpoints/best.ckpt")
    assert module.hparams.num_classes == 2
    # evaluate says how it was trained; the model card says so in words
    assert metrics["federated"]["clients"] == 3 and metrics["federated"]["rounds"] == 3
    assert report["federated"]["balanced_loss"] is balanced
    assert report["federated"]["control_variates"] is controlled
    card = privacy.describe_federated(metrics["federated"])
    assert f"Trained federated ({strategy}, Flower): 3 clients" in card
    assert "within the train stage's process (simulated clients)" in card
    assert "over TLS" in privacy.describe_federated({**metrics["federated"], "mode": "clients"})
    assert ("each client's mean step" in card) is controlled
    assert privacy.describe_federated(None) == ""
    curves = json.loads((tmp_path / "reports/train_curves.json").read_text())
    assert [row["epoch"] for row in curves] == [1, 2, 3]
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    history = client.get_metric_history(report["run_id"], "clients")
    assert [m.value for m in history] == [3, 3, 3]
    # FedExP's step each round, at least the average's, in the report and in MLflow
    steps = [r.get("server_step") for r in rounds]
    logged = client.get_metric_history(report["run_id"], "server_step")
    if strategy == "fedexp":
        assert all(step >= 1.0 for step in steps) and [m.value for m in logged] == steps
    else:
        assert steps == [None] * 3 and logged == []


def client_level(**privacy) -> ClientLevelPrivacy:
    return ClientLevelPrivacy(OmegaConf.create({
        "min_clients": 2, "fraction_fit": 1.0,
        "privacy": {"epsilon": 4.0, "delta": 1e-5, "clipping_norm": 0.5,
                    "accountant": "rdp", **privacy}}), clients=10, rounds=20)


def test_client_level_privacy_bounds_each_clients_reach_and_counts_what_it_spent():
    protected = client_level()
    current = [np.zeros((200, 200), dtype=np.float32), np.zeros(40, dtype=np.float32)]
    # without noise: one client's huge update moves the average by clip / clients asked
    protected.noise_multiplier = 0.0
    huge = [np.full_like(a, 100.0) for a in current]
    still = [a.copy() for a in current]
    moved = protected.aggregate(current, [huge, *[still] * 9])
    norm = np.sqrt(sum(np.sum(a.astype(np.float64) ** 2) for a in moved))
    assert norm == pytest.approx(0.5 / 10, rel=1e-5)
    assert moved[0].dtype == np.float32
    # half the clients asked answer: their sum is still divided by the ten asked
    small = [np.full_like(a, 1e-4) for a in current]
    halved = protected.aggregate(current, [small] * 5)
    assert np.allclose(halved[0], 0.5e-4)
    # with it: the average's noise has the standard deviation z x clip / clients asked
    with publicly_seeded():  # as a public seed would leave numpy and torch
        fresh = client_level()
        noised = fresh.aggregate(current, [still] * 10)
    assert np.std(np.concatenate([a.ravel() for a in noised])) == pytest.approx(
        fresh.noise_multiplier * 0.5 / 10, rel=0.05)
    with publicly_seeded():
        again = client_level().aggregate(current, [still] * 10)  # not from a public seed
    assert not np.array_equal(noised[0], again[0])
    # one release so far; all twenty rounds spend the target, as Opacus counts them:
    # every round as if every client took part (who is asked is no secret)
    assert 0 < fresh.record()["epsilon"] < 4.0 and fresh.record()["steps"] == 1
    fresh.released = 20
    record = fresh.record()
    accountant = create_accountant("rdp")
    accountant.history = [(fresh.noise_multiplier, 1.0, 20)]
    assert record["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5))
    assert record["epsilon"] == pytest.approx(4.0, rel=0.01)
    assert record["unit"] == "client" and record["sample_rate"] == 1.0
    assert "for a whole federated client" in privacy.describe(record)


def test_a_privately_federated_model_says_so_and_passes_its_epsilon_gate(workspace,
                                                                         tmp_path):
    cfg = train_dir(workspace, tmp_path, *federated(
        "trainer.federated.clients=3", "trainer.federated.rounds=2",
        "trainer.federated.privacy.enabled=true", "trainer.federated.privacy.epsilon=8",
        "gate.max_epsilon=8"))
    with restored_tracking_uri():
        report = fit(cfg, Paths(tmp_path))
        metrics, verdict = evaluate(cfg, Paths(tmp_path))
    # what the clients report goes unnoised, so it is not kept
    assert report["federated"]["clients_rows"] is None
    assert all(r["rows"] is None for r in report["federated"]["rounds"])
    record = metrics["privacy"]
    assert record["unit"] == "client" and record["steps"] == 2
    assert 0 < record["epsilon"] <= 8.0 + 1e-6
    (check,) = [c for c in verdict["checks"] if c["rule"] == "privacy"]
    assert check["passed"] and check["value"] == record["epsilon"]
    assert "server clipped and noised" in privacy.describe_federated(metrics["federated"])


def test_client_level_privacy_refuses_norm_statistics_and_server_momentum(image_repo,
                                                                          tmp_path):
    shutil.copytree(image_repo / "data/processed", tmp_path / "data/processed")
    cfg = compose("task=image_classification", "experiment=image_smoke", "model=cnn",
                  "trainer=federated", "trainer.federated.clients=2",
                  "trainer.federated.privacy.enabled=true")
    cfg.mlflow.tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(SystemExit, match="model.norm=group"):
        fit(cfg, Paths(tmp_path))
    for stepped in ("fedavgm", "fedexp"):
        cfg.trainer.federated.strategy = stepped
        with pytest.raises(SystemExit, match=f"strategy={stepped}"):
            check_settings(cfg, distilling=False, pruning=False)
    cfg.trainer.federated.strategy = "fedavg"
    cfg.trainer.federated.control_variates = True  # each client's would go unnoised
    with pytest.raises(SystemExit, match="privacy with control_variates"):
        check_settings(cfg, distilling=False, pruning=False)


def client_processes(stage: psutil.Process) -> list[psutil.Process]:
    return [child for child in stage.children(recursive=True)
            if "pipeline.modeling.federated.client" in " ".join(child.cmdline())]


def after_round_one(workspace, tmp_path, clients: int, rounds: int,
                    controlled: bool = False):
    """A train stage with `clients` real client processes, once round 1 has ended:
    (the stage's process, its clients' processes, what it printed so far)."""
    train_dir(workspace, tmp_path, *federated(
        "trainer.federated.mode=clients", f"trainer.federated.clients={clients}",
        f"trainer.federated.rounds={rounds}", "train.limit_train_batches=1.0",
        f"trainer.federated.control_variates={controlled}"))
    process = start_training(tmp_path)
    stage, lines = psutil.Process(process.pid), []
    deadline = time.monotonic() + 300
    for line in process.stdout:
        lines.append(line)
        if f"federated round 1/{rounds}" in line:
            break
        assert time.monotonic() < deadline, "".join(lines)
    running = client_processes(stage)
    assert len(running) == clients, "".join(lines)
    return process, running, lines


@pytest.mark.slow
def test_real_clients_go_on_without_one_killed_mid_run(workspace, tmp_path):
    # with control variates, which travel over gRPC in the rounds' configs and results
    process, clients, lines = after_round_one(workspace, tmp_path, clients=3, rounds=4,
                                              controlled=True)
    clients[-1].kill()  # round 2 has begun: this client dies in it
    rest, _ = process.communicate(timeout=600)
    output = "".join(lines) + rest
    assert process.returncode == 0, output[-4000:]
    report = json.loads((tmp_path / "reports/train.json").read_text())
    rounds = report["federated"]["rounds"]
    assert len(rounds) == 4 and len(rounds[0]["clients"]) == 3
    assert report["federated"]["control_variates"] is True
    assert len(rounds[-1]["clients"]) == 2  # the dead one is gone, the run went on
    assert "federated round 4/4: 2 of 3 clients" in output
    assert (tmp_path / "models/checkpoints/best.ckpt").exists()
    _, alive = psutil.wait_procs(clients[:-1], timeout=10)  # the others ended with it
    assert not alive, [c.pid for c in alive]
    assert "flwr" not in output.lower() and "deprecated" not in output, output[-3000:]


@pytest.mark.slow
def test_sigterm_stops_a_real_client_run_and_its_clients_at_once(workspace, tmp_path):
    """A stage told to stop mid-round does not wait for the round (up to
    round_timeout_s, 30 minutes) and leaves no client process behind."""
    process, clients, _ = after_round_one(workspace, tmp_path, clients=2, rounds=50)
    clients[0].suspend()  # round 2 cannot end: it waits for this client's answer
    process.terminate()
    process.communicate(timeout=60)
    assert process.returncode == 128 + 15
    gone, alive = psutil.wait_procs(clients, timeout=10)
    assert not alive, [c.pid for c in alive]

