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


def spent(checkpoint: Path) -> dict | None:
    """The privacy record a checkpoint carries (epsilon, delta, noise multiplier, ...
    at the moment it was saved), or None for a checkpoint of a fit without
    differential privacy."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    record = state.get("callbacks", {}).get(STATE_KEY)
    if not record or not record.get("steps"):
        return None
    return {key: value for key, value in record.items() if key != "accountant_state"}


def describe(record: dict | None) -> str:
    """The model card's line."""
    if record is None:
        return ("Not trained with differential privacy: no bound on what the weights "
                "reveal about any one training example.")
    epsilon = record["epsilon"]
    return (f"Trained with differential privacy (DP-SGD): ({epsilon:.2f}, "
            f"{record['delta']:.1e})-DP with respect to one training example, by the "
            f"{record['accountant']} accountant over {record['steps']} noisy steps "
            f"(noise multiplier {record['noise_multiplier']:.3f}, per-example gradient "
            f"norm clipped to {record['max_grad_norm']}). Not covered, treated as public "
            "data: the validation split, which chose the checkpoint"
            + "".join(f"; the {name}" for name in record.get("public", [])) + "."
            + (f" Not trained, kept as they started: {', '.join(record['frozen'])}."
               if record.get("frozen") else "")
            + ("" if math.isfinite(epsilon) else " The bound is infinite."))
