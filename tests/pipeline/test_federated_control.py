"""SCAFFOLD's control variates (trainer.federated.control_variates, control.py): the
client's correction of each local step, its own estimate, the server's average, and
the two travelling through a round's config and results."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import publicly_seeded
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from pipeline.modeling.federated.client import LocalClient
from pipeline.modeling.federated.client import weights as local_weights
from pipeline.modeling.federated.control import KEY, ControlledSteps, pack, unpack
from pipeline.modeling.federated.server import Tracked
from pipeline.modeling.federated.strategies import strategy
from pipeline.tasks.image_classification.classifier import ImageClassifier


def holding(layer: torch.nn.Module) -> torch.nn.Module:
    module = torch.nn.Module()
    module.model = layer
    return module


def step(callback: ControlledSteps, module: torch.nn.Module, optimizer, gradient) -> None:
    """One local step on `gradient`, the callback's hook before the optimiser's."""
    module.model.weight.grad = torch.tensor(gradient)
    callback.on_before_optimizer_step(None, module, optimizer)
    optimizer.step()


def test_each_step_swaps_the_clients_own_mean_step_for_the_federations():
    """With plain SGD the correction is the paper's: each step w -= rate (g + c - c_i),
    and c_i is the round's mean gradient, the corrections left out."""
    layer = torch.nn.Linear(2, 1, bias=False)
    module = holding(layer)
    sgd = torch.optim.SGD(layer.parameters(), lr=0.1)
    corrected = ControlledSteps()
    assert corrected.report() == {}  # nothing to report before a round
    # round 1: no c from the server, no c_i of its own: plain steps; c_i their mean
    corrected.receive(None)
    corrected.on_train_start(None, module)
    before = layer.weight.detach().clone()
    step(corrected, module, sgd, [[1.0, 2.0]])
    step(corrected, module, sgd, [[3.0, 6.0]])
    assert torch.allclose(layer.weight, before - 0.1 * torch.tensor([[4.0, 8.0]]))
    corrected.on_train_end(None, module)
    assert np.allclose(unpack(corrected.report()[KEY])[0], [[2.0, 4.0]])
    # round 2, c = (5, 5): w -= rate (g + c - c_i)
    corrected.receive(pack([np.array([[5.0, 5.0]], dtype=np.float32)]))
    corrected.on_train_start(None, module)
    before = layer.weight.detach().clone()
    step(corrected, module, sgd, [[1.0, 1.0]])
    assert torch.allclose(layer.weight, before - 0.1 * torch.tensor([[4.0, 2.0]]))
    # c_i measures the round's own steps, not the corrections
    corrected.on_train_end(None, module)
    assert torch.allclose(corrected.own[0], torch.tensor([[1.0, 1.0]]))
    # a step whose gradient overflowed (a mixed-precision scaler skips it) is neither
    # corrected nor counted; a round whose weights overflowed leaves the last c_i
    corrected.on_train_start(None, module)
    before = layer.weight.detach().clone()
    layer.weight.grad = torch.tensor([[float("inf"), 1.0]])
    corrected.on_before_optimizer_step(None, module, sgd)
    assert torch.equal(layer.weight, before) and corrected.rate_sums == [0.0]
    step(corrected, module, sgd, [[1.0, 1.0]])
    with torch.no_grad():
        layer.weight.fill_(float("nan"))
    corrected.on_train_end(None, module)
    assert torch.allclose(corrected.own[0], torch.tensor([[1.0, 1.0]]))
    corrected.receive(pack([np.zeros((3, 3), dtype=np.float32)]))
    with pytest.raises(ValueError, match="different models"):
        corrected.on_train_start(None, module)


def toy_client(controlled: bool) -> LocalClient:
    cfg = OmegaConf.create({
        "seed": 0, "trainer": {"accelerator": "cpu", "precision": "32-true",
                               "federated": {"control_variates": controlled}},
        "train": {"limit_train_batches": 1.0, "gradient_clip_val": 1.0}})
    rows = [{"pixels": torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(i)),
             "labels": torch.tensor(i % 2)} for i in range(6)]
    datamodule = SimpleNamespace(rows={"train": rows}, seed=0, train_labels=lambda: None,
                                 train_dataloader=lambda: DataLoader(rows, batch_size=2))
    with publicly_seeded(0):
        module = ImageClassifier({"name": "mlp", "hidden": [4]}, 1, 4, 4, 2, ["a", "b"],
                                 lr=0.01)
    return LocalClient(cfg, 0, datamodule, module)


def test_a_client_reports_its_estimate_and_trains_with_the_federations():
    """Through LocalClient.fit and a real local fit: round 1 reports c_i; in round 2 a
    c equal to it trains exactly as an uncorrected client does, and another c moves
    the weights elsewhere."""
    client, plain = toy_client(True), toy_client(False)
    start = local_weights(client.module.model)
    with publicly_seeded(0):  # a client's fit seeds the process: put the states back
        _, _, metrics = client.fit(start, {"round": 1, "rounds": 3, "local_epochs": 1})
        own = unpack(metrics[KEY])
        assert [a.shape for a in own] == [tuple(p.shape)
                                          for p in client.module.model.parameters()]
        twin = copy.deepcopy(client)
        round_two = {"round": 2, "rounds": 3, "local_epochs": 1}
        unchanged, _, _ = client.fit(start, {**round_two, KEY: pack(own)})
        uncorrected, _, _ = plain.fit(start, round_two)
        shifted, _, _ = twin.fit(start, {**round_two, KEY: pack([a + 1.0 for a in own])})
    assert all(np.allclose(a, b) for a, b in zip(unchanged, uncorrected, strict=True))
    assert not all(np.allclose(a, b) for a, b in zip(unchanged, shifted, strict=True))


def result(client: int, rows: int, control: list[np.ndarray]) -> tuple[object, FitRes]:
    return SimpleNamespace(cid=f"client-{client}"), FitRes(
        Status(Code.OK, ""), ndarrays_to_parameters([np.zeros(2)]), rows,
        {"client": client, "steps": 1, "train_loss": 0.5, KEY: pack(control)})


class Connected:
    """A client manager with clients `cids` connected."""

    def __init__(self, *cids: str):
        self.cids = list(cids)

    def wait_for(self, wanted: int, timeout: int) -> bool:
        return True

    def num_available(self) -> int:
        return len(self.cids)

    def all(self) -> dict:
        return dict.fromkeys(self.cids)

    def sample(self, num_clients: int, min_num_clients: int | None = None, criterion=None):
        return self.cids


def test_the_server_sends_the_rows_weighted_average_of_each_clients_latest():
    federated = OmegaConf.create({"strategy": "fedavg", "fraction_fit": 1.0,
                                  "min_clients": 2, "connect_timeout_s": 1,
                                  "control_variates": True})
    inner = strategy(federated, [np.zeros(2)], 1, 3)
    tracked = Tracked(inner, federated, 2, 3, global_model=None)

    def sent(server_round: int, connected=("client-0", "client-1")
             ) -> list[np.ndarray] | None:
        asked = tracked.configure_fit(server_round, ndarrays_to_parameters([np.zeros(2)]),
                                      Connected(*connected))
        configs = [fit_ins.config for _, fit_ins in asked]
        assert len(configs) == len(connected) and configs[0] == configs[-1]
        return unpack(configs[0][KEY]) if KEY in configs[0] else None

    assert sent(1) is None  # no client has an estimate yet: nothing to correct with
    parameters, _ = tracked.aggregate_fit(1, [result(0, 1, [np.zeros(2)]),
                                              result(1, 3, [np.array([4.0, 8.0])])], [])
    assert parameters is not None and KEY not in tracked.current
    assert np.allclose(sent(2)[0], [3.0, 6.0])
    # a round skipped for too few clients: its client's estimate still replaces the
    # one it sent before (the client keeps it too)
    assert tracked.aggregate_fit(2, [result(0, 1, [np.array([4.0, 4.0])])], [])[0] is None
    assert np.allclose(sent(3)[0], [4.0, 7.0])
    # an estimate that is not finite is refused: the client's earlier one stays
    tracked.aggregate_fit(3, [result(0, 1, [np.array([np.nan, 0.0])])], [])
    assert np.allclose(sent(4)[0], [4.0, 7.0])
    # a client that disconnected no longer counts
    assert np.allclose(sent(5, connected=("client-0",))[0], [4.0, 4.0])


def test_with_control_variates_off_no_round_carries_any():
    federated = OmegaConf.create({"strategy": "fedavg", "fraction_fit": 1.0,
                                  "min_clients": 2, "connect_timeout_s": 1,
                                  "control_variates": False})
    tracked = Tracked(strategy(federated, [np.zeros(2)], 1, 3), federated, 2, 3,
                      global_model=None)
    tracked.aggregate_fit(1, [result(0, 1, [np.ones(2)]), result(1, 1, [np.ones(2)])], [])
    asked = tracked.configure_fit(2, ndarrays_to_parameters([np.zeros(2)]),
                                  Connected("client-0", "client-1"))
    assert asked and all(KEY not in fit_ins.config for _, fit_ins in asked)
    assert toy_client(False).controlled is None


def test_a_weight_no_step_moved_has_no_step_of_its_own():
    """A weight without a gradient (a frozen one, an unused branch) is neither corrected
    nor given a c_i other than zero, whatever the shift."""
    layer = torch.nn.Linear(2, 1)
    module = holding(layer)
    sgd = torch.optim.SGD(layer.parameters(), lr=0.1)
    corrected = ControlledSteps()
    corrected.own = [torch.zeros(1, 2), torch.tensor([0.5])]
    corrected.receive(pack([np.ones((1, 2), dtype=np.float32), np.ones(1, dtype=np.float32)]))
    corrected.on_train_start(None, module)
    bias = layer.bias.detach().clone()
    step(corrected, module, sgd, [[1.0, 1.0]])  # the bias has no gradient
    corrected.on_train_end(None, module)
    assert torch.equal(layer.bias, bias)
    assert torch.allclose(corrected.own[0], torch.tensor([[1.0, 1.0]]))
    assert torch.equal(corrected.own[1], torch.zeros(1))
