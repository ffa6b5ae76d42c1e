"""Text classification: texts in, one label of a fixed set out.

The worked example of the task interface (pipeline/tasks/base.py):
- raw examples: text rows with a label, from csv/tsv/jsonl/parquet files or the Hub
  (collect.py, pipeline/data/readers.py);
- preprocessing saved in the bundle: `tokenizer.json`, with the normaliser and the
  personal-data masking inside it (tokenizer.py); the leakage rule counts equal,
  contained and near-duplicate texts (pipeline/data/grouping.py);
- models: transformer, lstm, pretrained (MiniLM) over token ids (models/);
- loss and metrics: cross-entropy (with a teacher's logits when distilling); accuracy,
  F1, ROC/PR-AUC, ECE;
- export signature: input_ids + attention_mask (int64, batch x tokens) -> logits;
- service: texts -> label and probabilities (serving/api/).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from datasets import Dataset
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer

from pipeline import atomic
from pipeline.config import Paths
from pipeline.data.splits import column
from pipeline.tasks.base import Task
from pipeline.tasks.classifier import optimizer_settings
from pipeline.tasks.text_classification import export, inference
from pipeline.tasks.text_classification.classifier import TextClassifier
from pipeline.tasks.text_classification.datamodule import TextDataModule
from pipeline.tasks.text_classification.models import build_model
from pipeline.tasks.text_classification.tokenizer import PAD
from serving.bundle.tasks import TEXT_CLASSIFICATION


class TextClassification(Task):
    name = TEXT_CLASSIFICATION

    def collect(self, data: DictConfig, seed: int, paths: Paths) -> dict:
        from pipeline.tasks.text_classification.collect import collect

        return collect(data, seed, paths)

    def preprocess(self, cfg: DictConfig, seed: int, paths: Paths) -> dict:
        from pipeline.tasks.text_classification.preprocess import preprocess

        return preprocess(cfg, seed, paths)

    def profile_summary(self, profile: dict) -> str:
        return (f"vocabulary {profile['vocab_size']}; train unknown-token rate "
                f"{profile['splits']['train']['unk_rate']:.4f}")

    def datamodule(self, cfg: DictConfig, paths: Paths,
                   transfer: Path | None = None) -> pl.LightningDataModule:
        tokenizer = Tokenizer.from_file(str(paths.processed / "tokenizer.json"))
        return TextDataModule(
            processed_dir=paths.processed,
            pad_id=tokenizer.token_to_id(PAD),
            batch_size=cfg.train.batch_size,
            seed=cfg.seed,
            num_workers=cfg.train.num_workers,
            transfer=transfer,
            front=partial(self.fixed_front, cfg, paths),
        )

    def fixed_front(self, cfg: DictConfig, paths: Paths):
        """The model's fixed first stage, if it has one (a frozen encoder;
        pipeline/tasks/fixed_features.py)."""
        if not cfg.model.get("freeze_encoder"):
            return None  # the other text models learn from the tokens up
        tokenizer = Tokenizer.from_file(str(paths.processed / "tokenizer.json"))
        profile = atomic.read_json(paths.processed / "profile.json")
        model = build_model(OmegaConf.to_container(cfg.model), tokenizer.get_vocab_size(),
                            len(profile["label_names"]), profile["max_length"],
                            tokenizer.token_to_id(PAD))
        return getattr(model, "fixed_features", None)

    def module(self, cfg: DictConfig, paths: Paths, distilling: bool = False
               ) -> TextClassifier:
        tokenizer = Tokenizer.from_file(str(paths.processed / "tokenizer.json"))
        profile = atomic.read_json(paths.processed / "profile.json")
        module = TextClassifier(
            model=OmegaConf.to_container(cfg.model),
            vocab_size=tokenizer.get_vocab_size(),
            num_classes=len(profile["label_names"]),
            max_length=profile["max_length"],
            pad_id=tokenizer.token_to_id(PAD),
            label_names=profile["label_names"],
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            warmup_ratio=cfg.train.warmup_ratio,
            optimizer=optimizer_settings(cfg),
            label_smoothing=cfg.train.label_smoothing,
            distill_weight=cfg.distill.weight if distilling else 0.0,
        )
        return module

    def warm_start(self, module: TextClassifier, cfg: DictConfig, paths: Paths) -> None:
        """`train.init_embeddings`: token embeddings from a pre-trained model's,
        PCA-compressed to the model's width."""
        if not cfg.train.get("init_embeddings"):
            return
        from pipeline.tasks.text_classification.models.pretrained import init_token_embeddings

        tokenizer = Tokenizer.from_file(str(paths.processed / "tokenizer.json"))
        explained = init_token_embeddings(module.model.embedding, tokenizer.get_vocab(),
                                          cfg.train.init_embeddings)
        print(f"train: token embeddings from {cfg.train.init_embeddings}, PCA to "
              f"{module.model.embedding.embedding_dim} dimensions ({explained:.0%} of the "
              "variance)", flush=True)

    def prune(self, module: TextClassifier, settings: DictConfig) -> tuple[dict, dict]:
        """The Transformer's weakest attention heads and feed-forward units removed
        (`train.prune.heads`, `d_ff`; prune.py)."""
        from pipeline.tasks.text_classification.prune import prune

        if settings.get("channels") is not None:
            raise ValueError("train.prune.channels prunes the image cnn; for text, set "
                             "train.prune.heads or d_ff, with channels null")
        return prune(module.model, dict(module.hparams.model), settings.heads, settings.d_ff)

    def load_module(self, checkpoint: Path) -> TextClassifier:
        return inference.load_module(checkpoint)

    def model_inputs(self, split: Dataset, paths: Paths) -> list[list[int]]:
        return column(split, "input_ids")

    def requests(self, split: Dataset) -> list[str]:
        return column(split, "text")

    def predict_logits(self, module: TextClassifier, rows: list[list[int]],
                       batch_size: int) -> np.ndarray:
        return inference.predict_logits(module, rows, batch_size)

    def export(self, module: TextClassifier, path: Path, opset: int) -> None:
        export.export_onnx(module.model, path, opset, module.hparams.pad_id)

    def quantize(self, fp32: Path, int8: Path, module: TextClassifier, val: Dataset,
                 paths: Paths, cfg: DictConfig) -> dict:
        return export.quantize_best(fp32, int8, module, self.model_inputs(val, paths), cfg)

    def bundle_fields(self, cfg: DictConfig, module: TextClassifier, profile: dict) -> dict:
        return {
            # what batch prediction reads from a file by default, as collect read it
            "text_columns": list(cfg.data.text_columns),
            "max_length": profile["max_length"],
            "pad_id": module.hparams.pad_id,
            "files": {"tokenizer": "tokenizer.json"},
        }

    def card_text(self, meta: dict) -> tuple[str, str, str]:
        model = (f"A `{meta['model']['name']}` text classifier over "
                 f"{len(meta['label_names'])} classes ({', '.join(meta['label_names'])}), "
                 f"exported to ONNX (fp32 and static int8). Input: up to "
                 f"{meta['max_length']} tokens; longer texts are truncated.")
        inputs = ("Text is NFKC-normalised, HTML is stripped, e-mail addresses, URLs and "
                  "phone numbers are replaced by placeholders before tokenization, in "
                  "training and in serving alike. The masking is pattern-based and does "
                  "not catch every form of personal data.")
        use = ("Classifying short English texts like those in the training data, with a "
               "person or a downstream check able to act on a wrong answer.")
        return model, inputs, use
