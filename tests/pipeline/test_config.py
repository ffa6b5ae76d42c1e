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
    (["task=image_classification", "experiment=federated_images"],
        lambda c: c.trainer.federated.strategy == "fedexp" and c.train.batch_size == 16
        and c.data.name == "fashion_mnist"),
    (["train.lr=0.01", "model.num_layers=3"], lambda c: c.train.lr == 0.01
        and c.model.name == "lstm" and c.model.num_layers == 3),  # the default model
    (["model=transformer", "model.n_layers=3"], lambda c: c.model.n_layers == 3),
])
def test_groups_compose(overrides, check):
    assert check(compose(*overrides))


def test_each_stage_declares_existing_params_and_its_own_script():
    params = OmegaConf.create(yaml.safe_load((ROOT / "params.yaml").read_text()))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["collect", "preprocess", "teacher", "transfer", "train",
                            "evaluate", "deploy", "serve"]
    absent = object()
    for name, stage in stages.items():
        assert f"pipeline/stages/{name}.py" in stage["deps"], name
        # code is listed by package: a stage's own scripts, pipeline's three shared
        # modules and the one ops module the serve stage starts services with are the
        # only single files (the rest of ops/ is deploy tooling no stage runs)
        single = ("pipeline/config.py", "pipeline/atomic.py", "pipeline/logs.py",
                  "ops/process.py")
        for dep in stage["deps"]:
            if dep.startswith(("pipeline/", "serving/", "ops/")):
                assert (ROOT / dep).is_dir() or dep.startswith("pipeline/stages/") \
                    or dep in single, f"{name}: {dep}"
        for key in stage["params"]:  # may be null (distill.teacher), never absent
            assert OmegaConf.select(params, key, default=absent) is not absent, f"{name}: {key}"
        assert "data" not in stage["params"] or name == "collect"
    # changing train.* cannot rerun collect or preprocess
    for name in ("collect", "preprocess"):
        assert not {"train", "model", "trainer"} & set(stages[name]["params"])


def test_dvc_hydra_composition_is_enabled():
    config = (ROOT / ".dvc" / "config").read_text()
    assert "[hydra]" in config and "enabled = true" in config


def imported_files(module: str, seen: set[str] | None = None) -> set[str]:
    """The repository's own files that `module` imports, directly or through others,
    at the top or inside functions."""
    import ast

    seen = set() if seen is None else seen
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT / module.replace(".", "/") / "__init__.py"
    rel = str(path.relative_to(ROOT))
    if rel in seen:
        return seen
    seen.add(rel)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline import atomic` names a module; `from x.y import f` does not
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        if module == "pipeline.tasks":  # tasks are imported by name, when chosen
            from pipeline.tasks import TASKS

            names += [spec.split(":")[0] for spec in TASKS.values()]
        for name in names:
            if name.split(".")[0] in ("pipeline", "serving", "ops") and (
                    (ROOT / (name.replace(".", "/") + ".py")).exists()
                    or (ROOT / name.replace(".", "/") / "__init__.py").exists()):
                imported_files(name, seen)
    return seen


def test_every_stage_depends_on_the_code_it_runs():
    """Editing shared code must rerun every stage that imports it: each stage's deps
    in dvc.yaml cover every repository file its module imports, however indirectly."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        module = stage["cmd"].split(" -m ")[1].split()[0]
        deps = [str(d).rstrip("/") for d in stage["deps"]]
        missing = sorted(f for f in imported_files(module) if not f.endswith("__init__.py")
                         and not any(f == d or f.startswith(d + "/") for d in deps))
        assert not missing, f"stage {name}: dvc.yaml deps miss {missing}"
