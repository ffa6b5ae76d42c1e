"""The task interface: what differs between text classification, image
classification and next-word prediction, declared once per task.

Everything else (the stages' order, splits by group and the leakage rule, the gate,
the registry and promotion, the bundle store, the service's batching, workers,
reload, metrics and prediction log, retraining) is shared and knows a task only
through a `Task`. `conf/task/<name>.yaml` chooses one (`task.name`); `pipeline.tasks.get`
returns it. A new task is a package under `pipeline/tasks/`, an entry in `TASKS`
(pipeline/tasks/__init__.py) and, for its bundles, one in serving/bundle/tasks.py:
an addition, not edits across the tree. docs/tasks.md walks text classification
through each method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from datasets import Dataset
from omegaconf import DictConfig

from pipeline.config import Paths
from serving.bundle.tasks import TASKS, TaskSpec


class Task(ABC):
    """One kind of problem, through every stage. Subclasses set `name`."""

    name: str

    @property
    def spec(self) -> TaskSpec:
        """What its bundles carry and what its model takes and gives, as the service
        checks them (serving/bundle/tasks.py)."""
        return TASKS[self.name]

    # -- collect: a source -> data/raw (+ manifest.json)
    @abstractmethod
    def collect(self, data: DictConfig, seed: int, paths: Paths) -> dict:
        """Read the configured source's raw examples and their labels, check them
        (naming the file and row of anything bad), write `paths.raw` atomically;
        returns the manifest (source, row counts, content hash)."""

    # -- preprocess: data/raw -> data/processed, with what the bundle will carry
    @abstractmethod
    def preprocess(self, cfg: DictConfig, seed: int, paths: Paths) -> dict:
        """Split by group under the leakage rule, fit the preprocessing the bundle
        carries (`spec.preprocessing`, e.g. tokenizer.json), encode every split and
        profile it (the drift reference); writes `paths.processed` atomically and
        returns the profile. `cfg` is the configuration's `preprocess` section."""

    def profile_summary(self, profile: dict) -> str:
        """A few words on what preprocess fitted, for its closing line."""
        return ""

    # -- train
    @abstractmethod
    def datamodule(self, cfg: DictConfig, paths: Paths,
                   transfer: Path | None = None) -> pl.LightningDataModule:
        """Batches of the processed splits (or of a distillation transfer set)."""

    @abstractmethod
    def module(self, cfg: DictConfig, paths: Paths, distilling: bool = False
               ) -> pl.LightningModule:
        """The configured model family with its loss, metrics and optimiser."""

    def warm_start(self, module: pl.LightningModule, cfg: DictConfig, paths: Paths) -> None:
        """Initialise a new module's weights from pre-trained ones, where the
        configuration asks (never when resuming or fine-tuning a pruned model). By
        default a task has nothing to start from."""
        return

    def prune(self, module: pl.LightningModule, settings: DictConfig) -> tuple[dict, dict]:
        """Structured pruning of a trained module (`train.prune`): the smaller model's
        config (what `module` builds from) and its state dict, which loads into that
        model strictly; the train stage fine-tunes it. By default a task's models
        cannot be pruned."""
        raise ValueError(f"train.prune: {self.name} models cannot be pruned; set "
                         "train.prune's heads, d_ff and channels to null")

    @abstractmethod
    def load_module(self, checkpoint: Path) -> pl.LightningModule:
        """A trained module back from its checkpoint, in eval mode."""

    # -- evaluate and deploy
    def scoring(self):
        """How its models are scored, judged and described (pipeline/tasks/scoring.py);
        classification's by default."""
        from pipeline.tasks.scoring import ClassificationScoring

        return ClassificationScoring()

    def drift_reference(self, bundle_dir: Path, paths: Paths, cfg: DictConfig) -> dict:
        """Drift references only the model can give, measured with the written bundle
        as the service measures requests; deploy adds them to the profile's
        `reference` in bundle.json. None by default (the profile's are the data's)."""
        return {}

    def check_bundle(self, bundle_dir: Path, module: pl.LightningModule, test: Dataset,
                     paths: Paths, cfg: DictConfig) -> dict:
        """Deploy's checks of the written bundle against the module on the test split;
        the report, or DeployError (pipeline/tasks/parity.py) naming what broke. By
        default classification's: preprocessing, fp32 and int8 parity, batch
        invariance."""
        from pipeline.tasks.parity import check_parity

        return check_parity(bundle_dir, self, module, self.requests(test),
                            self.model_inputs(test, paths), cfg)

    @abstractmethod
    def model_inputs(self, split: Dataset, paths: Paths) -> list:
        """The split's rows as the model takes them (token ids; normalised pixels, with
        the spec preprocess saved under `paths.processed`)."""

    @abstractmethod
    def requests(self, split: Dataset) -> list:
        """The split's rows as a client sends them to the service (e.g. texts)."""

    @abstractmethod
    def predict_logits(self, module: pl.LightningModule, rows: list,
                       batch_size: int) -> np.ndarray:
        """The module's outputs for `model_inputs` rows, in their order."""

    @abstractmethod
    def export(self, module: pl.LightningModule, path: Path, opset: int) -> None:
        """The model as ONNX with the task's signature (`spec.inputs` -> `spec.outputs`)."""

    @abstractmethod
    def quantize(self, fp32: Path, int8: Path, module: pl.LightningModule, val: Dataset,
                 paths: Paths, cfg: DictConfig) -> dict:
        """The static int8 model, calibrated on validation rows; returns what deploy
        reports about it (scheme, agreement on validation)."""

    @abstractmethod
    def bundle_fields(self, cfg: DictConfig, module: pl.LightningModule, profile: dict
                      ) -> dict:
        """bundle.json's task-specific fields (spec.meta among them) and the `files` its
        preprocessing adds."""

    @abstractmethod
    def card_text(self, meta: dict) -> tuple[str, str, str]:
        """The model card's own words: what the model is and takes, how inputs are
        prepared, and its intended use."""
