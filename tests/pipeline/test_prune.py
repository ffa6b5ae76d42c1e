"""Structured pruning (pipeline/tasks/text_classification/prune.py, train.prune): what
it removes, and that the pruned, fine-tuned model goes through export and the parity
checks like any other."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import tracking_in
from omegaconf import OmegaConf

from pipeline.config import Paths
from pipeline.stages.deploy import build_bundle
from pipeline.stages.train import prune_and_fine_tune
from pipeline.tasks.text_classification.models import build_model
from pipeline.tasks.text_classification.prune import prune

CONFIG = {"name": "transformer", "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64,
          "dropout": 0.0, "pooling": "mean"}


def silence(model, heads: list[int], units: list[int]) -> None:
    """Make heads and feed-forward units write nothing: their value weights and output
    columns, and their units' output columns, zero."""
    with torch.no_grad():
        for block in model.blocks:
            width = block.attention.head_dim
            qkv = block.attention.qkv.weight.view(3, block.attention.n_heads, width, -1)
            out = block.attention.out.weight.view(-1, block.attention.n_heads, width)
            for head in heads:
                qkv[2, head] = 0
                block.attention.qkv.bias.view(3, -1, width)[2, head] = 0
                out[:, head] = 0
            block.feed_forward[3].weight[:, units] = 0


def test_pruning_removes_the_heads_and_units_that_write_nothing():
    torch.manual_seed(0)
    model = build_model(CONFIG, vocab_size=50, num_classes=2, max_length=16, pad_id=0).eval()
    silent_units = list(range(0, 64, 2))  # half of them
    silence(model, heads=[1, 3], units=silent_units)
    config, state = prune(model, CONFIG, heads=2, d_ff=32)
    assert config == {**CONFIG, "n_heads": 2, "d_ff": 32, "head_dim": 8}
    pruned = build_model(config, vocab_size=50, num_classes=2, max_length=16, pad_id=0).eval()
    pruned.load_state_dict(state)  # strict: every shape fits
    for block in pruned.blocks:
        assert block.attention.qkv.out_features == 3 * 2 * 8
        assert block.attention.out.in_features == 2 * 8
        assert block.feed_forward[0].out_features == 32
    # what was removed wrote nothing, so the answers are the same
    ids = torch.randint(1, 50, (4, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    torch.testing.assert_close(pruned(ids, mask), model(ids, mask), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in pruned.parameters()) < sum(
        p.numel() for p in model.parameters())


def test_only_a_transformer_is_pruned_and_only_smaller():
    model = build_model(CONFIG, vocab_size=50, num_classes=2, max_length=16, pad_id=0)
    with pytest.raises(ValueError, match="heads: 5 is not between 1 and the model's 4"):
        prune(model, CONFIG, heads=5, d_ff=None)
    with pytest.raises(ValueError, match="only the transformer"):
        prune(model, {**CONFIG, "name": "lstm"}, heads=1, d_ff=None)


def test_a_pruned_fine_tuned_model_exports_and_passes_parity(workspace, tmp_path):
    path, cfg = workspace
    for part in ("data/processed", "models/checkpoints"):
        shutil.copytree(path / part, tmp_path / part)
    for report in ("reports/metrics.json", "reports/gate.json"):
        (tmp_path / report).parent.mkdir(exist_ok=True)
        shutil.copy2(path / report, tmp_path / report)
    cfg = OmegaConf.merge(cfg, {"train": {"prune": {"heads": 1, "d_ff": 16, "epochs": 1,
                                                    "lr": 1e-3}},
                                "mlflow": {"tracking_uri": tracking_in(
                                    tmp_path, cfg.mlflow.experiment)}})
    report = prune_and_fine_tune(cfg, Paths(tmp_path), None)
    assert report["best_score"] > 0.8  # the synthetic task survives pruning
    meta = build_bundle(cfg, Paths(tmp_path))  # DeployError if a parity check failed
    assert meta["model"]["n_heads"] == 1 and meta["model"]["d_ff"] == 16
    assert meta["parity"]["fp32_max_abs_diff"] <= cfg.deploy.fp32_max_abs_diff
