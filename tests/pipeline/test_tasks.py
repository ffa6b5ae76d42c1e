"""The task seam: the configuration chooses a task, and the stages reach everything
task-specific through it."""

from __future__ import annotations

import shutil

import pytest
from conftest import compose, tracking_in
from omegaconf import OmegaConf

from pipeline import tasks
from pipeline.config import Paths
from pipeline.modeling.training import fit
from pipeline.tasks.text_classification.task import TextClassification
from serving.bundle.tasks import TASKS


def test_an_unknown_task_names_the_known_ones():
    with pytest.raises(tasks.UnknownTask, match=r"task.name: unknown task 'images' "
                                                r"\(image_classification, next_word, "
                                                r"text_classification\)"):
        tasks.get("images")


def test_the_next_word_task_chooses_its_own_data_model_gate_and_preprocessing():
    cfg = compose("task=next_word")
    assert (cfg.data.name, cfg.model.name) == ("tiny_shakespeare", "lm_lstm")
    assert cfg.preprocess.tokenizer.type == "word" and "f1_macro" not in cfg.gate.floors
    assert cfg.gate.ceilings.perplexity_vs_baseline == 0.8


def test_the_image_task_chooses_its_own_data_model_and_preprocessing():
    cfg = compose("task=image_classification")
    assert (cfg.data.name, cfg.model.name) == ("fashion_mnist", "cnn")
    assert "tokenizer" not in cfg.preprocess and cfg.train.init_embeddings is None
    assert cfg.train.augment == {"crop_padding": 2, "flip": True}  # the data set's
    chosen = compose("task=image_classification", "data=cifar10", "model=resnet")
    assert (chosen.data.name, chosen.model.name) == ("cifar10", "resnet")
    assert chosen.train.augment.crop_padding == 4
    assert tasks.from_config(cfg).name == "image_classification"


def test_a_model_can_decline_the_data_sets_augmentation(tmp_path):
    task = tasks.get("image_classification")
    cnn = task.datamodule(compose("task=image_classification"), Paths(tmp_path))
    mlp = task.datamodule(compose("task=image_classification", "model=mlp"), Paths(tmp_path))
    assert cnn.augment == {"crop_padding": 2, "flip": True}
    assert mlp.augment == {}  # conf/model/mlp.yaml: augment: false


def test_the_configuration_chooses_the_task(smoke_cfg):
    assert smoke_cfg.task.name == "text_classification"
    task = tasks.from_config(smoke_cfg)
    assert isinstance(task, TextClassification)
    assert task.spec is TASKS["text_classification"]
    # params.yaml written before tasks existed names none: text classification
    assert isinstance(tasks.from_config(OmegaConf.create({"seed": 1})), TextClassification)


class Recording(TextClassification):
    """Text classification that notes which of its methods the stage called."""

    calls: list[str] = []

    def datamodule(self, *args, **kwargs):
        self.calls.append("datamodule")
        return super().datamodule(*args, **kwargs)

    def module(self, *args, **kwargs):
        self.calls.append("module")
        return super().module(*args, **kwargs)

    def warm_start(self, *args, **kwargs):
        self.calls.append("warm_start")
        return super().warm_start(*args, **kwargs)


def test_train_builds_its_data_and_model_through_the_task(workspace, tmp_path, monkeypatch):
    path, cfg = workspace
    monkeypatch.setitem(tasks.TASKS, "recording", f"{__name__}:Recording")
    run = Paths(tmp_path)
    shutil.copytree(Paths(path).processed, run.processed)
    cfg = OmegaConf.merge(cfg, {"task": {"name": "recording"}, "train": {"max_epochs": 1},
                                "mlflow": {"tracking_uri": tracking_in(
                                    tmp_path, cfg.mlflow.experiment)}})
    Recording.calls.clear()
    report = fit(cfg, run)
    assert Recording.calls == ["datamodule", "module", "warm_start"]
    assert run.checkpoint.is_file() and report["epochs"] == 1
