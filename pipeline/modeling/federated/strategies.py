"""How the server turns a round's client weights into the next global model:
`trainer.federated.strategy` picks FedAvg, FedAvgM, FedProx (Flower's) or FedExP.

Each round tells the clients its number and the rounds in all, so that their
learning-rate schedule follows the whole run's (client.py).
"""

from __future__ import annotations

import numpy as np
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg, FedAvgM, FedProx
from flwr.server.strategy.aggregate import aggregate
from omegaconf import DictConfig

STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedexp")
# Those that step the global weights themselves, which client-level privacy's noised
# average would replace.
SERVER_STEPPED = ("fedavgm", "fedexp")


class FedExP(FedAvg):
    """FedAvg with the server's step extrapolated past the clients' average
    (Jhunjhunwala et al. 2023, "FedExP: speeding up federated averaging via
    extrapolation"): the global weights move by `step` times the averaged update, where

        step = max(1, sum_i p_i ||d_i||^2 / (2 (||sum_i p_i d_i||^2 + epsilon)))

    over the clients' updates d_i, p_i a client's share of the round's rows (the paper
    weighs clients alike). Where the clients agree the
    average is as long as each update and the step stays 1 (FedAvg); where their
    updates point apart (label skew, a client's own noise) the average is shorter than
    each, and the step grows to make up for it, adaptively, with nothing to tune but
    `epsilon`. Only weights count in the norms: `buffers` (a norm's running
    statistics, which Tracked averages whatever the strategy) are left out.

    Stretched steps overshoot, and the global model swings from round to round; with
    `average_last_two` the model validated and handed on is the average of the last
    two global models (the paper's remedy), while the clients go on from the last."""

    def __init__(self, *, buffers: list[int], epsilon: float, average_last_two: bool,
                 **kwargs):
        if not epsilon > 0:
            raise ValueError("trainer.federated.extrapolation_epsilon must be above 0, "
                             f"not {epsilon}: a round where no client moved would divide "
                             "by zero")
        super().__init__(**kwargs)
        self.buffers, self.epsilon = set(buffers), epsilon
        self.average_last_two = average_last_two
        self.global_weights: list[np.ndarray] = []  # where this round's clients started
        self.last_start: list[np.ndarray] = []  # where the last round averaged started

    def __repr__(self) -> str:
        return f"FedExP(epsilon={self.epsilon})"

    def handed_on(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """The model to validate and hand on, the global weights being `arrays`: those,
        or with `average_last_two` their average with where the last round averaged
        started (buffers as it left them); a round skipped since changes neither."""
        if not self.average_last_two or not self.last_start:
            return arrays
        return [now if i in self.buffers else (now + before) / 2
                for i, (now, before) in enumerate(zip(arrays, self.last_start,
                                                      strict=True))]

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self.global_weights = parameters_to_ndarrays(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict]:
        if not results:
            return None, {}
        start = self.global_weights
        if not start:
            raise RuntimeError("FedExP: aggregate_fit before configure_fit, which holds "
                               "the weights the round's clients started from")
        clients = [(parameters_to_ndarrays(res.parameters), res.num_examples)
                   for _, res in results]
        average = aggregate(clients)
        rows = sum(n for _, n in clients)
        trained = [i for i in range(len(start)) if i not in self.buffers]

        def squared(arrays: list[np.ndarray]) -> float:
            return float(sum(np.sum(np.square(arrays[i] - start[i], dtype=np.float64))
                             for i in trained))

        spread = sum(n / rows * squared(arrays) for arrays, n in clients)
        step = max(1.0, spread / (2.0 * (squared(average) + self.epsilon)))
        moved = [w + step * (a - w) for w, a in zip(start, average, strict=True)]
        self.last_start = start
        return ndarrays_to_parameters(moved), {"server_step": step}


def strategy(settings: DictConfig, initial: list[np.ndarray], local_epochs: int,
             rounds: int, buffers: list[int] = ()) -> FedAvg:
    """The strategy `trainer.federated.strategy` names, starting from `initial` weights
    (`buffers`: their positions that are a norm's statistics, not weights)."""
    def fit_config(server_round: int) -> dict:
        return {"round": server_round, "rounds": rounds, "local_epochs": local_epochs}

    common = dict(fraction_fit=float(settings.fraction_fit), fraction_evaluate=0.0,
                  min_fit_clients=int(settings.min_clients),
                  min_available_clients=int(settings.min_clients),
                  accept_failures=True, on_fit_config_fn=fit_config,
                  initial_parameters=ndarrays_to_parameters(initial),
                  fit_metrics_aggregation_fn=lambda metrics: {})
    name = settings.strategy
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedavgm":  # Hsu et al. 2019: momentum on the server's averaged update
        return FedAvgM(**common, server_learning_rate=float(settings.server_lr),
                       server_momentum=float(settings.server_momentum))
    if name == "fedprox":
        return FedProx(**common, proximal_mu=float(settings.proximal_mu))
    if name == "fedexp":
        return FedExP(**common, buffers=list(buffers),
                      epsilon=float(settings.get("extrapolation_epsilon", 1e-3)),
                      average_last_two=bool(settings.get("average_last_two")))
    raise ValueError(f"trainer.federated.strategy: unknown strategy {name!r} "
                     f"({', '.join(STRATEGIES)})")
