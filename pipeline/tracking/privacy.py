"""The privacy a model spent, as its checkpoint records it: what evaluate reports for
the weights it scores (reports/metrics.json, MLflow, the gate's `max_epsilon`), and the
model card's words for it. Written during training by
pipeline/modeling/privacy.py's `DifferentialPrivacy`; read here without Opacus.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

STATE_KEY = "DifferentialPrivacy"  # the callback's entry in a checkpoint's "callbacks"
FEDERATED_KEY = "federated"  # a federated fit's summary, at a checkpoint's top level


def spent(checkpoint: Path) -> dict | None:
    """The privacy record a checkpoint carries (epsilon, delta, noise multiplier, ...
    at the moment it was saved), or None for a checkpoint of a fit without
    differential privacy."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    record = state.get("callbacks", {}).get(STATE_KEY)
    if not record or not record.get("steps"):
        return None
    return {key: value for key, value in record.items() if key != "accountant_state"}


def federated(checkpoint: Path) -> dict | None:
    """How a federated fit trained the checkpoint (clients, partition, strategy,
    rounds: pipeline/modeling/federated/run.py), or None for a centralised fit."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return state.get(FEDERATED_KEY)


def describe_federated(record: dict | None) -> str:
    """The model card's sentence on where the training data stayed."""
    if record is None:
        return ""
    partition = record["partition"]
    how = (f"Dirichlet({partition['alpha']}) label skew" if partition["by"] == "dirichlet"
           else {"iid": "an even random split", "group": "data.group_column's groups"}
           .get(partition["by"], partition["by"]))
    noised = ("; the server clipped and noised their average (client-level differential "
              "privacy, above)" if record.get("privacy")
              else " (no differential privacy on the updates)")
    # simulation runs every client in the train stage's process: nothing travels
    travelled = ("to the server over TLS" if record.get("mode") == "clients"
                 else "within the train stage's process (simulated clients)")
    # SCAFFOLD's control variates: each client's mean step travels too
    sent = ("model updates and each client's mean step of its round (control "
            "variates)" if record.get("control_variates") else "model updates")
    return (f" Trained federated ({record['strategy']}, Flower): {record['clients']} "
            f"clients, the training rows dealt out by {how}, {record['rounds']} rounds; "
            f"each client's rows stayed with it and only {sent} went {travelled}, "
            f"where the server saw each one{noised}.")


def describe(record: dict | None) -> str:
    """The model card's paragraph."""
    if record is None:
        return ("Not trained with differential privacy: no bound on what the weights "
                "reveal about any one training example.")
    epsilon = record["epsilon"]
    if record.get("unit") == "client":
        return (f"Trained with client-level differential privacy (DP-FedAvg): "
                f"({epsilon:.2f}, {record['delta']:.1e})-DP for a whole federated client, "
                f"every row it holds at once (and, given which client holds which rows, "
                f"for any one row), by the {record['accountant']} accountant over "
                f"{record['steps']} rounds (noise multiplier "
                f"{record['noise_multiplier']:.3f}, each client's update clipped to "
                f"{record['clipping_norm']}, every round counted as if every client took "
                "part, noise from a generator seeded from the operating system's "
                "randomness). The server is trusted: it sees each update before the "
                "noise. Not covered, treated as public data: the validation split, "
                "which chose the round kept; the data profile and vocabulary in "
                "bundle.json; how the rows were dealt to the clients. Each training run "
                "spends its own budget: searches and retrainings on the same clients "
                "add up, and are not counted here.")
    frozen = (f" Not trained, kept as they started: {', '.join(record['frozen'])}."
              if record.get("frozen") else "")
    return (f"Trained with differential privacy (DP-SGD): ({epsilon:.2f}, "
            f"{record['delta']:.1e})-DP over the whole fit, by the {record['accountant']} "
            f"accountant over {record['steps']} noisy steps (noise multiplier "
            f"{record['noise_multiplier']:.3f}, per-example gradient norm clipped to "
            f"{record['max_grad_norm']}, noise and batches from the operating system's "
            "randomness). The unit protected is one row of the processed training data: "
            "a source that splits one record into several rows (SST-2's phrases of a "
            "sentence, a next-word corpus's token blocks) protects that record as "
            "several. Not covered, treated as public data: the validation split, which "
            "chose the checkpoint; the data profile and vocabulary in bundle.json"
            + "".join(f"; the {name}" for name in record.get("public", [])) + "."
            + frozen + " Each training run spends its own budget: hyperparameter "
            "searches and retrainings on the same data add up, and are not counted here."
            + ("" if math.isfinite(epsilon) else " The bound is infinite."))
