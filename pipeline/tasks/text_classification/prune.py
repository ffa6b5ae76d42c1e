"""Structured pruning of the Transformer: whole attention heads and feed-forward units
removed from every encoder block, then the smaller model fine-tuned (train.prune).

Removing whole heads and units, not single weights, leaves an ordinary, smaller
`TransformerClassifier` (fewer heads of the same width, a narrower feed-forward
layer), so the export, the parity checks, the gate, deploy and serving take it as they
take any model, and it is faster on any CPU, without sparse kernels.

Which ones go: in each block, those whose weights carry the least, scored by
magnitude: a head by the norm of its value projection times the norm of its slice of
the output projection (what it can add to the residual stream), a feed-forward unit
by the norm of its input row times the norm of its output column. The survivors keep
their order, so pruning is deterministic.
"""

from __future__ import annotations

import torch

from pipeline.tasks.text_classification.models.transformer import TransformerClassifier


def head_scores(block) -> torch.Tensor:
    """(n_heads,): how much each head of a block's attention can write."""
    attention = block.attention
    heads, width = attention.n_heads, attention.head_dim
    qkv = attention.qkv.weight.view(3, heads, width, -1)
    out = attention.out.weight.view(-1, heads, width)
    return qkv[2].flatten(1).norm(dim=1) * out.transpose(0, 1).flatten(1).norm(dim=1)


def unit_scores(block) -> torch.Tensor:
    """(d_ff,): how much each feed-forward unit of a block can write."""
    up, down = block.feed_forward[0].weight, block.feed_forward[3].weight
    return up.norm(dim=1) * down.norm(dim=0)


def strongest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The indices of the `keep` highest scores, in their original order."""
    return scores.topk(keep).indices.sort().values


def pruned_config(model_cfg: dict, model: TransformerClassifier, heads: int | None,
                  d_ff: int | None) -> dict:
    """The model config of the pruned model; ValueError when it would not be smaller."""
    if model_cfg.get("name") != "transformer":
        raise ValueError(f"train.prune: only the transformer can be pruned, not "
                         f"{model_cfg.get('name')!r}")
    attention = model.blocks[0].attention
    heads = attention.n_heads if heads is None else heads
    d_ff = model.blocks[0].feed_forward[0].out_features if d_ff is None else d_ff
    if not 1 <= heads <= attention.n_heads:
        raise ValueError(f"train.prune.heads: {heads} is not between 1 and the model's "
                         f"{attention.n_heads} heads")
    if not 1 <= d_ff <= model.blocks[0].feed_forward[0].out_features:
        raise ValueError(f"train.prune.d_ff: {d_ff} is not between 1 and the model's "
                         f"{model.blocks[0].feed_forward[0].out_features} units")
    return {**model_cfg, "n_heads": heads, "d_ff": d_ff, "head_dim": attention.head_dim}


def prune_state(model: TransformerClassifier, heads: int, d_ff: int) -> dict:
    """The state dict of `model` with, in every block, all but its `heads` strongest
    heads and `d_ff` strongest feed-forward units removed."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, block in enumerate(model.blocks):
        prefix = f"blocks.{i}."
        attention = block.attention
        kept = strongest(head_scores(block), heads)
        width = attention.head_dim
        qkv_w = state[prefix + "attention.qkv.weight"].view(3, attention.n_heads, width, -1)
        qkv_b = state[prefix + "attention.qkv.bias"].view(3, attention.n_heads, width)
        state[prefix + "attention.qkv.weight"] = qkv_w[:, kept].reshape(3 * heads * width, -1)
        state[prefix + "attention.qkv.bias"] = qkv_b[:, kept].reshape(-1)
        out_w = state[prefix + "attention.out.weight"].view(-1, attention.n_heads, width)
        state[prefix + "attention.out.weight"] = out_w[:, kept].reshape(-1, heads * width)

        units = strongest(unit_scores(block), d_ff)
        for name in ("feed_forward.0.weight", "feed_forward.0.bias"):
            state[prefix + name] = state[prefix + name][units]
        state[prefix + "feed_forward.3.weight"] = state[prefix + "feed_forward.3.weight"][:, units]
    return state


def prune(model: TransformerClassifier, model_cfg: dict, heads: int | None,
          d_ff: int | None) -> tuple[dict, dict]:
    """(config, state dict) of the pruned model: build it from the config (pipeline.
    models.build_model) and load the state, strictly."""
    config = pruned_config(model_cfg, model, heads, d_ff)
    return config, prune_state(model, config["n_heads"], config["d_ff"])
