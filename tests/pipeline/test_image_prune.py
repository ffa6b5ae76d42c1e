"""Channel pruning of the image CNN (pipeline/tasks/image_classification/prune.py,
train.prune.channels): what it removes, that the surgery leaves the answers of what is
kept unchanged, and that the pruned, fine-tuned model goes through the train stage,
export and deploy's parity checks like any other."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose, tracking_in
from omegaconf import OmegaConf

from pipeline.config import Paths
from pipeline.stages.deploy import build_bundle
from pipeline.stages.evaluate import evaluate
from pipeline.stages.train import prune_and_fine_tune, pruning
from pipeline.tasks.base import Task
from pipeline.tasks.image_classification.arrays import to_dataset
from pipeline.tasks.image_classification.models import build_model
from pipeline.tasks.image_classification.preprocess import preprocess
from pipeline.tasks.image_classification.prune import filter_scores, prune
from pipeline.tasks.image_classification.task import ImageClassification
from pipeline.tasks.text_classification.task import TextClassification

CONFIG = {"name": "cnn", "widths": [8, 16], "hidden": 32, "dropout": 0.0}
SHAPE = (3, 12, 12)  # two poolings leave 3x3: the flatten order matters


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def convolutions(model) -> list[tuple[torch.nn.Conv2d, torch.nn.Module]]:
    layers = list(model.features)
    return [(layer, layers[i + 1]) for i, layer in enumerate(layers)
            if isinstance(layer, torch.nn.Conv2d)]


def silenced_cnn(seed: int = 0) -> tuple[torch.nn.Module, list[np.ndarray]]:
    """A CNN (eval mode, with running statistics of its own) where a random half of every
    convolution's channels output exactly zero: zero filters, and zero BatchNorm scale
    and shift, so they add nothing downstream. Returns it and each layer's live channels."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(CONFIG, *SHAPE, num_classes=5).eval()
    live = []
    with torch.no_grad():
        for conv, norm in convolutions(model):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.2, 0.2)
            dead = rng.permutation(conv.out_channels)[:conv.out_channels // 2]
            conv.weight[dead] = 0
            norm.weight[dead] = 0
            norm.bias[dead] = 0
            live.append(np.setdiff1d(np.arange(conv.out_channels), dead))
    return model, live


def test_pruning_removes_the_silent_channels_and_keeps_the_answers():
    model, live = silenced_cnn()
    config, state = prune(model, CONFIG, 0.5)
    assert config == {**CONFIG, "widths": [4, 8]}
    pruned = build_model(config, *SHAPE, num_classes=5).eval()
    pruned.load_state_dict(state)  # strict: every shape fits
    assert [conv.out_channels for conv, _ in convolutions(pruned)] == [4, 4, 8, 8]
    assert pruned.head[1].in_features == 8 * 3 * 3
    assert parameters(pruned) < parameters(model) / 2
    # the survivors are the live channels, in order, with their own weights and statistics
    inputs = np.arange(SHAPE[0])
    for (conv, norm), (old_conv, old_norm), kept in zip(
            convolutions(pruned), convolutions(model), live, strict=True):
        torch.testing.assert_close(conv.weight, old_conv.weight[kept][:, inputs])
        torch.testing.assert_close(norm.running_var, old_norm.running_var[kept])
        inputs = kept
    # what was removed output nothing, so the logits are the same
    pixels = torch.randn(6, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(pruned(pixels), model(pixels), atol=1e-5, rtol=0)


def test_the_filters_with_the_largest_l1_norm_are_kept():
    torch.manual_seed(1)
    model = build_model(CONFIG, *SHAPE, num_classes=5)
    conv = model.features[0]
    # L1 norms in a known order, unlike the L2 order: channel 0's one large weight has
    # the largest L2 norm but the smallest L1 norm.
    with torch.no_grad():
        conv.weight.fill_(0.01)
        conv.weight[0].zero_()
        conv.weight[0, 0, 0, 0] = 0.25
        for channel, scale in zip([2, 5, 7, 3], [4.0, 3.0, 2.0, 1.5], strict=True):
            conv.weight[channel] *= scale
    assert filter_scores(conv).argmin() == 0
    _, state = prune(model, CONFIG, 0.5)
    torch.testing.assert_close(state["features.0.weight"], conv.weight[[2, 3, 5, 7]])


def test_group_norm_keeps_whole_groups_and_blocks_may_differ():
    config = {**CONFIG, "widths": [[8, 12], 16], "norm": "group", "groups": 4}
    model = build_model(config, *SHAPE, num_classes=5)
    for share, widths in ((0.5, [[4, 8], 8]), (0.3, [4, 4]), (0.01, [4, 4]), (1, [[8, 12], 16])):
        pruned_config, state = prune(model, config, share)
        assert pruned_config["widths"] == widths, share
        pruned = build_model(pruned_config, *SHAPE, num_classes=5)
        pruned.load_state_dict(state)
        assert all(norm.num_channels % 4 == 0 for _, norm in convolutions(pruned))
        assert pruned(torch.randn(2, *SHAPE)).shape == (2, 5)
    # batch norm: the nearest count (8 x 0.3125 = 2.5: 3), at least one channel
    batch = {**config, "norm": "batch"}
    model = build_model(batch, *SHAPE, num_classes=5)
    assert prune(model, batch, 0.3125)[0]["widths"] == [[3, 4], 5]
    assert prune(model, batch, 0.01)[0]["widths"] == [1, 1]


@pytest.mark.parametrize("config", [{"name": "mlp", "hidden": [16]},
                                    {"name": "resnet", "widths": [8], "blocks": 1}])
def test_only_the_cnn_is_pruned(config):
    model = build_model(config, *SHAPE, num_classes=5)
    with pytest.raises(ValueError, match=f"only the image cnn is pruned, not '{config['name']}'"):
        prune(model, config, 0.5)


def test_the_share_and_the_settings_are_checked():
    model = build_model(CONFIG, *SHAPE, num_classes=5)
    for share in (0, 1.5, None, "half"):
        with pytest.raises(ValueError, match="in \\(0, 1\\]"):
            prune(model, CONFIG, share)
    settings = OmegaConf.create({"heads": 2, "d_ff": None, "channels": 0.5})
    module = type("Module", (), {"model": model, "hparams": OmegaConf.create({"model": CONFIG})})
    with pytest.raises(ValueError, match="heads and d_ff prune the text Transformer"):
        ImageClassification().prune(module, settings)
    with pytest.raises(ValueError, match="channels prunes the image cnn"):
        TextClassification().prune(module, settings)
    with pytest.raises(ValueError, match="image_classification models cannot be pruned"):
        Task.prune(ImageClassification(), module, settings)
    assert pruning(OmegaConf.create({"train": {"prune": {"heads": None, "d_ff": None,
                                                         "channels": 0.5}}}))
    assert not pruning(OmegaConf.create({"train": {"prune": {"heads": None, "d_ff": None,
                                                             "channels": None}}}))


# ------------------------------------------------------------------ through the stages


SIDE, CLASSES = 8, 3


def quadrant_split(per_class: int, seed: int):
    """uint8 8x8 grey noise whose class is its bright quadrant (top left, top right,
    bottom left), as collect writes a split."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(CLASSES), per_class)
    pixels = rng.integers(0, 90, (len(labels), SIDE, SIDE, 1), dtype=np.uint8)
    for i, label in enumerate(labels):
        top, left = divmod(int(label), 2)
        pixels[i, top * 4:top * 4 + 4, left * 4:left * 4 + 4] += 150
    return to_dataset(pixels, labels, [""] * len(labels), np.arange(len(labels)),
                      ["tl", "tr", "bl"])


def write_raw(paths: Paths) -> None:
    from datasets import DatasetDict

    DatasetDict({"train": quadrant_split(40, 0), "test": quadrant_split(10, 1)}).save_to_disk(
        str(paths.raw / "dataset"))
    image = {"height": SIDE, "width": SIDE, "channels": 1, "mean": [0.0], "std": [1.0]}
    (paths.raw / "manifest.json").write_text(json.dumps(
        {"name": "quadrants", "image": image, "content_hash": "quadrants"}))


def test_a_pruned_fine_tuned_cnn_exports_and_passes_parity(tmp_path):
    from pipeline.modeling.training import fit

    paths = Paths(tmp_path)
    cfg = compose("task=image_classification", "experiment=image_smoke")
    cfg.model = OmegaConf.create(CONFIG)  # the smoke experiment's mlp, replaced
    cfg = OmegaConf.merge(cfg, {
        "train": {"max_epochs": 4, "batch_size": 16, "lr": 1e-2, "augment": None,
                  "prune": {"channels": 0.5, "epochs": 2, "lr": 3e-3}},
        "deploy": {"calibration_rows": 16, "model_name": "quadrants-classifier"},
        "mlflow": {"tracking_uri": tracking_in(tmp_path, cfg.mlflow.experiment)}})
    write_raw(paths)
    preprocess(cfg.preprocess, cfg.seed, paths)
    assert fit(cfg, paths)["best_score"] > 0.8
    evaluate(cfg, paths)
    report = prune_and_fine_tune(cfg, paths, None)
    assert report["best_score"] > 0.8  # the quadrants survive pruning
    module = ImageClassification().load_module(paths.checkpoint)
    assert module.hparams.model["widths"] == [4, 8]
    meta = build_bundle(cfg, paths)  # DeployError if a parity check failed
    assert meta["model"]["widths"] == [4, 8]
    assert meta["parity"]["fp32_max_abs_diff"] <= cfg.deploy.fp32_max_abs_diff
