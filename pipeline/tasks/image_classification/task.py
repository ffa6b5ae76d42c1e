"""Image classification: images in, one label of a fixed set out.

Through the task interface (pipeline/tasks/base.py):
- raw examples: IDX files (Fashion-MNIST, MNIST), CIFAR-10's python batches, or a
  folder per class with an optional manifest (readers.py, collect.py), every image
  converted to `data.image` as it is read;
- preprocessing saved in the bundle: `image_spec.json` (size, channels, resize rule,
  mean and std; serving/bundle/images.py); the leakage rule counts exact and
  near-duplicate images (duplicates.py);
- models: mlp, cnn, resnet over normalised pixels (models.py), with seeded
  augmentation of training batches (datamodule.py);
- loss and metrics: cross-entropy; accuracy, F1, ROC/PR-AUC, ECE (the same as text);
- export signature: pixels (float32 batch x channels x height x width) -> logits;
- service: images (base64 or multipart files, or a UINT8 tensor) -> label and
  probabilities.
"""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
from datasets import Dataset
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from pipeline import atomic
from pipeline.config import Paths
from pipeline.tasks.base import Task
from pipeline.tasks.image_classification.arrays import pixels
from serving.bundle.images import ImageSpec
from serving.bundle.tasks import IMAGE_CLASSIFICATION

SPEC_FILE = "image_spec.json"


def spec_of(paths: Paths) -> ImageSpec:
    return ImageSpec.from_dict(atomic.read_json(paths.processed / SPEC_FILE))


def png(image: np.ndarray) -> bytes:
    """An image as a client would upload it: a PNG file (lossless)."""
    out = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out, "PNG")
    return out.getvalue()


class ImageClassification(Task):
    name = IMAGE_CLASSIFICATION

    def collect(self, data: DictConfig, seed: int, paths: Paths) -> dict:
        from pipeline.tasks.image_classification.collect import collect

        return collect(data, seed, paths)

    def preprocess(self, cfg: DictConfig, seed: int, paths: Paths) -> dict:
        from pipeline.tasks.image_classification.preprocess import preprocess

        return preprocess(cfg, seed, paths)

    def profile_summary(self, profile: dict) -> str:
        image, groups = profile["image"], profile["splitting"]
        return (f"{image['height']}x{image['width']}x{image['channels']} images, mean "
                f"{[round(v, 4) for v in image['mean']]}, std "
                f"{[round(v, 4) for v in image['std']]}; {groups['groups']} training "
                f"groups ({groups['groups_from']})")

    def datamodule(self, cfg: DictConfig, paths: Paths, transfer: Path | None = None):
        from pipeline.tasks.image_classification.datamodule import ImageDataModule

        if transfer is not None:
            raise ValueError("distill.teacher: distillation is for text classification; "
                             "set distill.teacher=null for images")
        # `model.augment: false`: a model that trains better on the images as they are
        augment = cfg.train.get("augment") if cfg.model.get("augment", True) else None
        return ImageDataModule(
            processed_dir=paths.processed,
            batch_size=cfg.train.batch_size,
            seed=cfg.seed,
            num_workers=cfg.train.num_workers,
            augment=OmegaConf.to_container(augment, resolve=True) if augment else None,
            front=partial(self.fixed_front, cfg, paths),
        )

    def fixed_front(self, cfg: DictConfig, paths: Paths):
        """The model's fixed first stage, if it has one (pipeline/tasks/fixed_features.py)."""
        from pipeline.tasks.image_classification.models import fixed_front

        spec = spec_of(paths)
        return fixed_front(self.model_config(cfg), spec.channels, spec.height, spec.width)

    @staticmethod
    def model_config(cfg: DictConfig) -> dict:
        return {key: value for key, value in OmegaConf.to_container(cfg.model).items()
                if key != "augment"}  # the data's concern, not the network's

    def module(self, cfg: DictConfig, paths: Paths, distilling: bool = False):
        from pipeline.tasks.classifier import optimizer_settings
        from pipeline.tasks.image_classification.classifier import ImageClassifier

        spec = spec_of(paths)
        profile = atomic.read_json(paths.processed / "profile.json")
        return ImageClassifier(
            model=self.model_config(cfg),
            channels=spec.channels,
            height=spec.height,
            width=spec.width,
            num_classes=len(profile["label_names"]),
            label_names=profile["label_names"],
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            warmup_ratio=cfg.train.warmup_ratio,
            optimizer=optimizer_settings(cfg),
            label_smoothing=cfg.train.label_smoothing,
        )

    def prune(self, module, settings: DictConfig) -> tuple[dict, dict]:
        """The cnn's weakest convolution channels removed (`train.prune.channels`: the
        share of each convolution's channels kept; prune.py)."""
        from pipeline.tasks.image_classification.prune import prune

        if settings.get("heads") is not None or settings.get("d_ff") is not None:
            raise ValueError("train.prune.heads and d_ff prune the text Transformer; for "
                             "images, set train.prune.channels, with heads and d_ff null")
        return prune(module.model, dict(module.hparams.model), settings.get("channels"))

    def load_module(self, checkpoint: Path):
        from pipeline.tasks.image_classification.inference import load_module

        return load_module(checkpoint)

    def model_inputs(self, split: Dataset, paths: Paths) -> np.ndarray:
        """Normalised float32 [rows, channels, height, width], as training saw them."""
        return spec_of(paths).normalise(pixels(split))

    def requests(self, split: Dataset) -> list[bytes]:
        return [png(image) for image in pixels(split)]

    def predict_logits(self, module, rows: np.ndarray, batch_size: int) -> np.ndarray:
        from pipeline.tasks.image_classification.inference import predict_logits

        return predict_logits(module, rows, batch_size)

    def export(self, module, path: Path, opset: int) -> None:
        from pipeline.tasks.image_classification.export import export_onnx

        h = module.hparams
        export_onnx(module.model, path, opset, h.channels, h.height, h.width)

    def quantize(self, fp32: Path, int8: Path, module, val: Dataset, paths: Paths,
                 cfg: DictConfig) -> dict:
        """Static int8 calibrated on a seeded sample of validation images; reports how
        often its labels agree with PyTorch's on the whole validation split."""
        from pipeline.tasks.image_classification.export import quantize_int8
        from serving.bundle.bundle import RuntimeOptions

        inputs = self.model_inputs(val, paths)
        rows = np.random.default_rng(cfg.seed).permutation(len(inputs))
        calibration = inputs[np.sort(rows[:cfg.deploy.calibration_rows])]
        quantize_int8(fp32, int8, calibration)
        session = ort.InferenceSession(str(int8), RuntimeOptions().session_options(),
                                       providers=["CPUExecutionProvider"])
        int8_labels = np.concatenate([session.run(["logits"], {"pixels": inputs[i:i + 512]})[0]
                                      for i in range(0, len(inputs), 512)]).argmax(1)
        reference = self.predict_logits(module, inputs, cfg.evaluate.batch_size).argmax(1)
        return {"scheme": "qdq", "calibration_rows": len(calibration),
                "validation_agreement": {"qdq": float((int8_labels == reference).mean())}}

    def bundle_fields(self, cfg: DictConfig, module, profile: dict) -> dict:
        return {"image": profile["image"], "files": {"image_spec": SPEC_FILE}}

    def card_text(self, meta: dict) -> tuple[str, str, str]:
        image = meta["image"]
        colour = "grayscale" if image["channels"] == 1 else "RGB"
        model = (f"A `{meta['model']['name']}` image classifier over "
                 f"{len(meta['label_names'])} classes ({', '.join(meta['label_names'])}), "
                 f"exported to ONNX (fp32 and static int8). Input: {colour} images of "
                 f"{image['height']}x{image['width']} pixels.")
        inputs = (f"Every image, in training and in serving alike, is converted to "
                  f"{colour} (transparency composited onto white), resized by the "
                  f"`{image['resize']}` rule to {image['height']}x{image['width']}, and "
                  f"normalised with the training split's per-channel mean "
                  f"{[round(v, 4) for v in image['mean']]} and standard deviation "
                  f"{[round(v, 4) for v in image['std']]} (`image_spec.json`).")
        use = ("Classifying images like those in the training data (the same kind of "
               "subject, framing and resolution), with a person or a downstream check able "
               "to act on a wrong answer.")
        return model, inputs, use
