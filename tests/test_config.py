"""Configuration: params.yaml is the composition of conf/, every group composes, and
each stage declares only parameters that exist."""

from __future__ import annotations

import pytest
import yaml
from conftest import ROOT, compose
from omegaconf import OmegaConf


def test_committed_params_yaml_is_a_fresh_composition_of_conf():
    fresh = OmegaConf.to_container(compose())
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == fresh, "params.yaml is stale: run `make params` and commit it"


@pytest.mark.parametrize("overrides,check", [
    (["trainer=gpu"], lambda c: c.trainer.accelerator == "gpu"
        and c.trainer.precision == "bf16-mixed"),
    (["trainer=ddp"], lambda c: c.trainer.strategy == "ddp" and c.trainer.devices == -1),
    (["trainer=ddp", "trainer.num_nodes=4"], lambda c: c.trainer.num_nodes == 4),
    (["trainer=ddp_cpu"], lambda c: c.trainer.accelerator == "cpu" and c.trainer.devices == 2),
    (["data=ag_news"], lambda c: c.data.labels["4"] == "Sci/Tech"
        and c.deploy.model_name == "ag_news-classifier"),
    (["data=hub"], lambda c: c.data.source == "hub"),
    (["data=files"], lambda c: c.data.source == "files"),
    (["experiment=smoke"], lambda c: c.train.max_epochs == 1 and c.model.d_model == 32
        and c.data.max_rows == 600),
    (["train.lr=0.01", "model.n_layers=3"], lambda c: c.train.lr == 0.01
        and c.model.n_layers == 3),
])
def test_groups_compose(overrides, check):
    assert check(compose(*overrides))


def test_each_stage_declares_existing_params_and_its_own_script():
    params = OmegaConf.create(yaml.safe_load((ROOT / "params.yaml").read_text()))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["collect", "preprocess", "train", "evaluate", "deploy", "serve"]
    for name, stage in stages.items():
        assert f"pipeline/{name}.py" in stage["deps"], name
        for key in stage["params"]:
            assert OmegaConf.select(params, key) is not None, f"{name}: {key}"
        assert "data" not in stage["params"] or name == "collect"
    # changing train.* cannot rerun collect or preprocess
    for name in ("collect", "preprocess"):
        assert not {"train", "model", "trainer"} & set(stages[name]["params"])


def test_dvc_hydra_composition_is_enabled():
    config = (ROOT / ".dvc" / "config").read_text()
    assert "[hydra]" in config and "enabled = true" in config
