"""Optimiser settings every task's LightningModule shares (beside the tasks, not in
pipeline/modeling/, which imports the tasks: the folders stay layered)."""

from __future__ import annotations

import torch


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
