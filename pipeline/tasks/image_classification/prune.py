"""Structured pruning of the image CNN: whole convolution channels removed, then the
smaller model fine-tuned (train.prune.channels, through `Task.prune`).

Removing whole output channels, not single weights, leaves an ordinary, narrower `CNN`
(smaller `widths`), so export, the parity checks, the gate, deploy and serving take it
as they take any model, and it is faster on any CPU without sparse kernels. A channel
goes everywhere it appears: its filter, its norm's scale, shift and running
statistics, the next convolution's input slice, and, after the last convolution, its
columns of the first fully connected layer (flattened channel-major: c x h x w).

Which ones go (Li et al. 2017, "Pruning Filters for Efficient ConvNets"): in each
convolution, those whose filters have the smallest L1 norm. Every layer is scored on
the trained weights independently of what the others lose, and the survivors keep
their order, so pruning is deterministic.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.tasks.image_classification.models import CNN


def convolutions(model: CNN) -> list[tuple[int, int]]:
    """(convolution, its norm) indices in `model.features`, in order."""
    layers = list(model.features)
    return [(i, i + 1) for i, layer in enumerate(layers) if isinstance(layer, nn.Conv2d)]


def filter_scores(conv: nn.Conv2d) -> torch.Tensor:
    """(out_channels,): the L1 norm of each output channel's filter."""
    return conv.weight.detach().abs().sum(dim=(1, 2, 3))


def kept_count(channels: int, share: float, groups: int) -> int:
    """How many of `channels` a share keeps, to the nearest (halves up): at least one,
    and with GroupNorm a whole number of its groups (every group keeps as many)."""
    step = groups or 1
    return max(step, math.floor(channels * share / step + 0.5) * step)


def strongest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The indices of the `keep` highest scores, in their original order."""
    return scores.topk(keep).indices.sort().values


def check_settings(model_cfg: dict, share: object) -> float:
    """The share to keep; ValueError naming what cannot be pruned or is out of range."""
    if model_cfg.get("name") != "cnn":
        raise ValueError(f"train.prune.channels: only the image cnn is pruned, not "
                         f"{model_cfg.get('name')!r}")
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
        raise ValueError(f"train.prune.channels: the share of each convolution's channels "
                         f"kept, in (0, 1], not {share!r}")
    return float(share)


def kept_channels(model: CNN, share: float) -> list[torch.Tensor]:
    """For each convolution, the indices of the output channels it keeps."""
    kept = []
    for conv_at, norm_at in convolutions(model):
        conv, norm = model.features[conv_at], model.features[norm_at]
        groups = norm.num_groups if isinstance(norm, nn.GroupNorm) else 0
        keep = kept_count(conv.out_channels, share, groups)
        kept.append(strongest(filter_scores(conv), keep))
    return kept


def pruned_widths(kept: list[torch.Tensor]) -> list[int | list[int]]:
    """`widths` of the pruned CNN: one number per block where both convolutions keep
    as many channels, else the pair."""
    counts = [len(k) for k in kept]
    pairs = zip(counts[::2], counts[1::2], strict=True)
    return [first if first == second else [first, second] for first, second in pairs]


def prune_state(model: CNN, kept: list[torch.Tensor]) -> dict:
    """The state dict of `model` with only the `kept` channels of every convolution."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = convolutions(model)
    previous = None  # the channels the previous convolution kept: this one's inputs
    for (conv_at, norm_at), channels in zip(layers, kept, strict=True):
        weight = state[f"features.{conv_at}.weight"][channels]
        state[f"features.{conv_at}.weight"] = (weight if previous is None
                                               else weight[:, previous])
        for name in ("weight", "bias", "running_mean", "running_var"):
            key = f"features.{norm_at}.{name}"
            if key in state:  # GroupNorm has no running statistics
                state[key] = state[key][channels]
        previous = channels
    # The flattened features are channel-major, so each channel owns h x w columns.
    hidden = model.head[1].out_features
    columns = state["head.1.weight"].view(hidden, model.features[layers[-1][0]].out_channels, -1)
    state["head.1.weight"] = columns[:, kept[-1]].reshape(hidden, -1)
    return state


def prune(model: CNN, model_cfg: dict, share: object) -> tuple[dict, dict]:
    """(config, state dict) of the pruned CNN: build it from the config (models.
    build_model) and load the state, strictly."""
    share = check_settings(model_cfg, share)
    kept = kept_channels(model, share)
    config = {**model_cfg, "widths": pruned_widths(kept)}
    return config, prune_state(model, kept)
