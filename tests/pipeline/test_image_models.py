"""Image classification's model half: the model families, the data module's batches and
augmentation, that the mlp and the cnn learn, and the fp32 and int8 ONNX exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import pytorch_lightning as pl
import torch
from datasets import Array3D, Dataset, DatasetDict, Features, Value

from pipeline.tasks.classifier import parameter_groups
from pipeline.tasks.image_classification.classifier import ImageClassifier
from pipeline.tasks.image_classification.datamodule import ImageDataModule
from pipeline.tasks.image_classification.export import export_onnx, quantize_int8
from pipeline.tasks.image_classification.inference import load_module, predict_logits
from pipeline.tasks.image_classification.models import build_model, fixed_front
from pipeline.tasks.image_classification.scattering import Scattering2D
from serving.bundle.images import ImageSpec

SIDE, CLASSES = 8, 3
SPEC = ImageSpec(SIDE, SIDE, 1, mean=(0.4,), std=(0.3,))
SIZES = {"train": 16, "val": 8, "test": 8}  # images per class


def quadrant_images(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, 8, 8, 1] noise whose class is the quadrant that is bright (top left,
    top right, bottom left)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(CLASSES), per_class)
    pixels = rng.integers(0, 90, (len(labels), SIDE, SIDE, 1), dtype=np.uint8)
    half = SIDE // 2
    for i, label in enumerate(labels):
        top, left = divmod(int(label), 2)
        pixels[i, top * half:(top + 1) * half, left * half:(left + 1) * half] += 150
    return pixels, labels


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Path:
    """A processed directory in the data contract: the dataset and image_spec.json."""
    root = tmp_path_factory.mktemp("processed")
    features = Features({"pixels": Array3D(shape=(SIDE, SIDE, 1), dtype="uint8"),
                         "label": Value("int64"), "group": Value("string")})
    splits = {}
    for seed, (name, per_class) in enumerate(SIZES.items()):
        pixels, labels = quadrant_images(per_class, seed)
        splits[name] = Dataset.from_dict(
            {"pixels": pixels, "label": labels, "group": [f"{name}{i}" for i in labels]},
            features=features)
    DatasetDict(splits).save_to_disk(str(root / "dataset"))
    (root / "image_spec.json").write_text(json.dumps(SPEC.to_dict()))
    return root


def data(processed: Path, seed: int = 0, augment: dict | None = None,
         batch_size: int = 8) -> ImageDataModule:
    module = ImageDataModule(processed, batch_size=batch_size, seed=seed, augment=augment)
    module.setup("fit")
    return module


def batches(loader) -> list[dict]:
    return list(loader)


# ------------------------------------------------------------------ models


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("config", [{"name": "mlp"}, {"name": "cnn"}, {"name": "resnet"},
                                    {"name": "cnn", "norm": "group"},
                                    {"name": "resnet", "norm": "group", "groups": 4},
                                    {"name": "tanh_cnn"}, {"name": "scatter_linear"}])
def test_each_family_maps_images_to_logits(config, shape):
    torch.manual_seed(0)
    model = build_model(config, *shape, num_classes=10).eval()
    assert model(torch.randn(2, *shape)).shape == (2, 10)
    if config.get("norm") == "group" or config["name"] in ("tanh_cnn", "scatter_linear"):
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_unknown_models_and_options_are_refused():
    with pytest.raises(ValueError, match="unknown model 'nope' \\(mlp, cnn, resnet, "
                                         "tanh_cnn, scatter_linear\\)"):
        build_model({"name": "nope"}, 1, 28, 28, 10)
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        build_model({"name": "cnn", "norm": "layer"}, 1, 28, 28, 10)
    with pytest.raises(ValueError, match="not divisible"):
        build_model({"name": "cnn", "norm": "group", "groups": 5}, 1, 28, 28, 10)
    with pytest.raises(ValueError, match="model.convs: .* leave nothing"):
        build_model({"name": "tanh_cnn", "convs": [[16, 8, 2, 0]]}, 1, 8, 8, 10)
    with pytest.raises(TypeError, match="depth"):
        build_model({"name": "resnet", "depth": 3}, 1, 28, 28, 10)


@pytest.mark.parametrize(("channels", "side"), [(1, 28), (3, 32)])
def test_the_scattering_layers_compute_kymatios_transform(channels, side):
    """The convolutions give what kymatio's FFTs give (its NumPy frontend), to within
    the filters' crop, for every channel and in kymatio's channel order."""
    from kymatio.scattering2d.frontend.numpy_frontend import ScatteringNumPy2D

    images = np.random.default_rng(0).random((3, channels, side, side), dtype=np.float32)
    expected = ScatteringNumPy2D(J=2, shape=(side, side))(images)  # [N, C, 81, h, w]
    layer = Scattering2D(side, side, J=2, L=8)
    assert not list(layer.parameters())
    got = layer(torch.from_numpy(images)).numpy()
    assert got.shape == (3, channels * 81, side // 4, side // 4)
    np.testing.assert_allclose(got, expected.reshape(got.shape), rtol=0,
                               atol=2e-3 * np.abs(expected).max())
    with pytest.raises(ValueError, match="does not divide into more than one 2\\^2 cell"):
        Scattering2D(30, 28)
    with pytest.raises(ValueError, match="more than one"):
        Scattering2D(4, 4)
    assert not layer.state_dict()  # rebuilt from kymatio, not saved


def test_no_weight_decay_on_norms_and_biases():
    model = build_model({"name": "cnn"}, 1, 8, 8, 3)
    decay, plain = parameter_groups(model, 0.01)
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0


# ------------------------------------------------------------------ data module


def test_batches_are_normalised_pixels_and_labels(processed):
    module = data(processed)
    train, val = batches(module.train_dataloader()), batches(module.val_dataloader())
    assert len(train) == 6 and len(batches(module.test_dataloader())) == 3
    assert train[0]["pixels"].shape == (8, 1, SIDE, SIDE)
    assert train[0]["pixels"].dtype == torch.float32 and train[0]["labels"].dtype == torch.int64
    assert sorted(torch.cat([b["labels"] for b in train]).tolist()) == sorted([0, 1, 2] * 16)
    # validation: in order, unaugmented, exactly what the service's normalisation gives
    expected = SPEC.normalise(quadrant_images(SIZES["val"], 1)[0])
    np.testing.assert_array_equal(torch.cat([b["pixels"] for b in val]).numpy(), expected)
    with pytest.raises(ValueError, match="unknown option\\(s\\) rotate"):
        data(processed, augment={"rotate": 10})


def test_the_same_seed_gives_the_same_batches(processed):
    augment = {"crop_padding": 2, "flip": True}
    first = batches(data(processed, 7, augment).train_dataloader())
    again = batches(data(processed, 7, augment).train_dataloader())
    other = batches(data(processed, 8, augment).train_dataloader())
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["labels"], b["labels"])
    assert not all(torch.equal(a["labels"], b["labels"]) for a, b in zip(first, other, strict=True))
    # and each epoch its own order and augmentation
    loader = data(processed, 7, augment).train_dataloader()
    loader.sampler.set_epoch(1)
    later = batches(loader)
    assert not all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(first, later, strict=True))


def test_augmentation_shifts_and_flips_whole_images(processed):
    """Every augmented image is its original shifted by at most 2 pixels (the uncovered
    border is the fill colour) and perhaps mirrored; and some are changed."""
    module = data(processed, 3, {"crop_padding": 2, "flip": True}, batch_size=48)
    plain = module.rows["train"].pixels
    background = float(SPEC.normalise(np.zeros((1, SIDE, SIDE, 1), np.uint8))[0, 0, 0, 0])
    padded = torch.nn.functional.pad(plain, (2, 2, 2, 2), value=background)
    loader = module.train_dataloader()
    (key,) = list(loader.sampler)  # (epoch, batch number, the batch's indices)
    batch = loader.dataset[key]
    changed = 0
    for image, index in zip(batch["pixels"], key[2], strict=True):
        candidates = [padded[index, :, dy:dy + SIDE, dx:dx + SIDE] for dy in range(5)
                      for dx in range(5)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(image, c) for c in candidates)
        changed += not torch.equal(image, plain[index])
    assert changed > 24


def test_a_fixed_front_is_computed_once_and_batches_carry_its_features(processed):
    """scatter_linear's scattering has no parameters: the data module computes it once
    per image and its batches carry the features, which the model's head takes."""
    config = {"name": "scatter_linear", "groups": 9}
    built = []

    def build():
        built.append(torch.rand(1))  # draws from torch's generator: must not leak out
        return fixed_front(config, 1, SIDE, SIDE)

    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    module = ImageDataModule(processed, batch_size=8, seed=0, front=build)
    module.setup("fit")
    assert len(built) == 1
    # building it drew nothing from the run's generator (the trained model's weights)
    assert torch.equal(torch.rand(1), expected)
    (val,) = [next(iter(module.val_dataloader()))]
    assert set(val) == {"features", "labels"}
    # evaluate scores the whole model on the test split: no features computed for it
    assert set(next(iter(module.test_dataloader()))) == {"pixels", "labels"}
    model = build_model(config, 1, SIDE, SIDE, CLASSES).eval()
    pixels = torch.from_numpy(SPEC.normalise(quadrant_images(SIZES["val"], 1)[0][:8]))
    torch.testing.assert_close(val["features"], model.fixed_features(pixels))
    with torch.no_grad():
        torch.testing.assert_close(model.head(val["features"]), model(pixels))
    # features of shifted copies would change every epoch: refused, not silently stale
    with pytest.raises(ValueError, match="train.augment: .*model.augment=false"):
        ImageDataModule(processed, 8, 0, augment={"flip": True},
                        front=lambda: model.fixed_features).setup("fit")
    # a model that learns from the pixels up has no fixed stage
    assert fixed_front({"name": "cnn"}, 1, SIDE, SIDE) is None


# ------------------------------------------------------------------ training and export


def fit(processed: Path, model: dict, augment: dict | None = None, **training
        ) -> tuple[ImageClassifier, pl.Trainer]:
    pl.seed_everything(0)
    module = ImageClassifier(model, 1, SIDE, SIDE, CLASSES, ["tl", "tr", "bl"],
                             **{"lr": 1e-2, **training})
    trainer = pl.Trainer(max_epochs=8, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1)
    trainer.fit(module, datamodule=data(processed, 0, augment))
    assert trainer.callback_metrics["val_acc"] > 0.9
    assert {"train_acc", "train_f1", "train_loss", "val_f1", "val_loss"} <= set(
        trainer.callback_metrics)
    return module.eval(), trainer


@pytest.fixture(scope="module")
def trained_cnn(processed) -> tuple[ImageClassifier, pl.Trainer]:
    return fit(processed, {"name": "cnn", "widths": [8, 16], "hidden": 32, "dropout": 0.1},
               {"crop_padding": 1})


def test_the_mlp_learns(processed):
    fit(processed, {"name": "mlp", "hidden": [32], "dropout": 0.1})


def test_the_tanh_cnn_learns_with_sgd_and_momentum(processed):
    module, trainer = fit(processed, {"name": "tanh_cnn", "convs": [[8, 3, 1, 1]],
                                      "hidden": 16},
                          lr=0.1, weight_decay=0.0,
                          optimizer={"name": "sgd", "momentum": 0.9})
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.defaults["momentum"] == 0.9


def test_the_scatter_linear_model_learns_on_its_features_and_exports_whole(processed,
                                                                          tmp_path):
    pl.seed_everything(0)
    config = {"name": "scatter_linear", "groups": 9}
    module = ImageClassifier(config, 1, SIDE, SIDE, CLASSES, ["tl", "tr", "bl"], lr=1e-2)
    trainer = pl.Trainer(max_epochs=8, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1)
    datamodule = ImageDataModule(processed, batch_size=8, seed=0,
                                 front=lambda: fixed_front(config, 1, SIDE, SIDE))
    trainer.fit(module, datamodule=datamodule)
    assert trainer.callback_metrics["val_acc"] > 0.9
    # the bundle's model takes pixels: the scattering is inside the ONNX graph
    export_onnx(module.model, tmp_path / "model.onnx", 18, 1, SIDE, SIDE)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    pixels = data(processed).rows["test"].pixels
    (logits,) = session.run(["logits"], {"pixels": pixels.numpy()})
    with torch.no_grad():
        expected = module.model(pixels).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    # static int8, scattering convolutions and all, keeps the answers
    quantize_int8(tmp_path / "model.onnx", tmp_path / "model.int8.onnx",
                  data(processed).rows["train"].pixels.numpy())
    quantized = ort.InferenceSession(str(tmp_path / "model.int8.onnx"),
                                     providers=["CPUExecutionProvider"])
    (logits,) = quantized.run(["logits"], {"pixels": pixels.numpy()})
    # all but at most one near-tie: int8 kernels round differently across CPUs
    assert (logits.argmax(1) == expected.argmax(1)).sum() >= len(expected) - 1


def test_the_cnn_learns_and_its_checkpoint_rebuilds_it(trained_cnn, processed, tmp_path):
    cnn, trainer = trained_cnn
    checkpoint = tmp_path / "best.ckpt"
    trainer.save_checkpoint(checkpoint)
    loaded = load_module(checkpoint)
    assert not loaded.training and loaded.hparams.label_names == ["tl", "tr", "bl"]
    pixels = data(processed).rows["test"].pixels.numpy()
    expected = cnn(torch.from_numpy(pixels)).detach().numpy()
    for batch_size in (1, 5, 64):
        np.testing.assert_allclose(predict_logits(loaded, pixels, batch_size), expected,
                                   atol=1e-5)
    assert predict_logits(loaded, pixels[:0], 4).shape == (0, CLASSES)


def test_onnx_matches_pytorch_and_int8_agrees(trained_cnn, processed, tmp_path):
    cnn = trained_cnn[0]
    fp32, int8 = tmp_path / "model.onnx", tmp_path / "model.int8.onnx"
    export_onnx(cnn.model, fp32, 18, 1, SIDE, SIDE)
    session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    (pixels_input,) = session.get_inputs()
    assert pixels_input.name == "pixels" and isinstance(pixels_input.shape[0], str)
    assert [o.name for o in session.get_outputs()] == ["logits"]
    rows = data(processed).rows
    held_out = torch.cat([rows["val"].pixels, rows["test"].pixels]).numpy()
    with torch.no_grad():
        reference = cnn.model(torch.from_numpy(held_out)).numpy()
    for size in (1, 5):
        (logits,) = session.run(["logits"], {"pixels": held_out[:size]})
        np.testing.assert_allclose(logits, reference[:size], atol=1e-4)

    calibration = rows["train"].pixels.numpy()
    quantize_int8(fp32, int8, calibration)
    quantized = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    (logits,) = quantized.run(["logits"], {"pixels": held_out})
    np.testing.assert_array_equal(logits.argmax(1), reference.argmax(1))
    again = tmp_path / "again.int8.onnx"
    quantize_int8(fp32, again, calibration)
    assert again.read_bytes() == int8.read_bytes()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_both_exporters_keep_the_batch_axis_dynamic(exporter, tmp_path):
    """Three channels, residual blocks and GroupNorm, through either exporter."""
    torch.manual_seed(0)
    model = build_model({"name": "resnet", "widths": [8, 16], "blocks": 1, "norm": "group",
                         "groups": 4}, 3, 12, 12, 4).eval()
    model.onnx_exporter = exporter
    export_onnx(model, tmp_path / "model.onnx", 18, 3, 12, 12)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    for size in (1, 5):
        pixels = torch.randn(size, 3, 12, 12)
        (logits,) = session.run(["logits"], {"pixels": pixels.numpy()})
        np.testing.assert_allclose(logits, model(pixels).detach().numpy(), atol=1e-4)
