"""tune: the search space read from conf/, an Optuna search on a tiny budget nested in
MLflow and feeding the pipeline, and the same search shared by worker processes through
a PostgreSQL study."""

from __future__ import annotations

import datetime
import os
import shutil

import mlflow
import optuna
import pytest
import yaml
from conftest import ROOT, compose, inside, tracking_in
from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from pg import postgres_server

from pipeline.config import Paths
from pipeline.config import compose as compose_in
from pipeline.loops import tune as tune_module
from pipeline.loops.tune import main, tune
from pipeline.loops.tune_space import (
    SpaceError,
    check_against_conf,
    parse_space,
    trial_overrides,
    tuned_experiment,
)
from pipeline.loops.tune_worker import storage

CONF = ROOT / "conf"
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
# tiny trials on the workspace's synthetic data (its tokenizer is trained on its own
# rows, so no MiniLM start)
TINY = ["experiment=smoke", "train.init_embeddings=null", "tune.max_epochs=2",
        "tune.limit_train_batches=1.0", "tune.space.model.choices=[transformer_tiny]",
        "tune.space={train.batch_size:{choices:[16,32]}}"]


# ---------------------------------------------------------------- the space in conf/


def test_the_default_space_in_conf_becomes_hydra_overrides():
    cfg = compose()
    space = parse_space(cfg.tune.space, CONF)
    assert cfg.model.name in next(d for d in space if d.key == "model").choices
    trial = optuna.trial.FixedTrial({"model": "transformer", "train.lr": 0.0012345678,
                                     "model.dropout": 0.25, "train.batch_size": 128})
    overrides = trial_overrides(space, trial)
    assert overrides == ["model=transformer", "train.lr=0.0012345678", "model.dropout=0.25",
                         "train.batch_size=128"]
    chosen = compose(*overrides)
    assert (chosen.model.name, chosen.model.d_model) == ("transformer", 128)
    assert (chosen.train.lr, chosen.model.dropout, chosen.train.batch_size) == (
        0.0012345678, 0.25, 128)


def test_each_entry_type_samples_its_own_distribution():
    space = parse_space({"model": {"choices": ["lstm", "transformer"]},
                         "train.lr": {"low": 3e-4, "high": 3e-3, "log": True},
                         "model.dropout": {"low": 0.0, "high": 0.3, "step": 0.1},
                         "model.num_layers": {"low": 1, "high": 3, "int": True},
                         "train.patience": None}, CONF)  # null: not searched
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    values = dict(o.split("=") for o in trial_overrides(space, trial))
    assert trial.distributions == {
        "model": CategoricalDistribution(["lstm", "transformer"]),
        "train.lr": FloatDistribution(3e-4, 3e-3, log=True),
        "model.dropout": FloatDistribution(0.0, 0.3, step=0.1),
        "model.num_layers": IntDistribution(1, 3)}
    assert values["model.num_layers"] in {"1", "2", "3"}


@pytest.mark.parametrize("entry,error", [
    ({"train.lr": {"low": 3e-3, "high": 3e-4, "log": True}},
     "tune.space.train.lr: low must be < high"),
    ({"train.lr": {"low": 0.0, "high": 1e-3, "log": True}},
     "tune.space.train.lr: log needs low > 0"),
    ({"train.lr": {"low": 1e-4, "high": 1e-2, "log": True, "step": 1e-4}},
     "tune.space.train.lr: log and step cannot be combined"),
    ({"model.dropout": {"low": 0.0}},
     "tune.space.model.dropout: needs `choices`, or both `low` and `high`"),
    ({"model.dropout": {"low": 0.0, "high": 0.3, "lgo": True}},
     r"tune.space.model.dropout: unknown field\(s\) \['lgo'\]"),
    ({"model.dropout": [0.0, 0.3]}, "tune.space.model.dropout: expected a mapping"),
    ({"model.num_layers": {"low": 1, "high": 3.5, "int": True}},
     "tune.space.model.num_layers: high must be an integer"),
    ({"train.batch_size": {"choices": []}},
     "tune.space.train.batch_size: choices must be a non-empty list"),
    ({"train.batch_size": {"choices": [32], "low": 16, "high": 64}},
     "tune.space.train.batch_size: `choices` cannot be combined"),
    ({"model": {"choices": ["lstm", "lsmt"]}},
     r"tune.space.model: \['lsmt'\] not in conf/model/"),
    ({}, "tune.space: empty"),
])
def test_a_bad_space_entry_is_named_in_the_error(entry, error):
    with pytest.raises(SpaceError, match=error):
        parse_space(entry, CONF)


def test_an_entry_that_one_model_choice_lacks_is_refused_before_any_trial():
    space = parse_space({"model": {"choices": ["lstm", "transformer"]},
                         "model.num_layers": {"low": 1, "high": 3, "int": True}}, CONF)
    with pytest.raises(SpaceError, match="tune.space.model.num_layers: the configuration "
                                         "with model=transformer has no `model.num_layers`"):
        check_against_conf(space, [], lambda more: compose_in(more, CONF))
    # the default space sets only keys every model choice has
    check_against_conf(parse_space(compose().tune.space, CONF), [],
                       lambda more: compose_in(more, CONF))


def test_the_tuned_experiment_sets_the_best_trials_group_and_values(tmp_path):
    shutil.copytree(CONF, tmp_path / "conf")
    (tmp_path / "conf/experiment/tuned.yaml").write_text(tuned_experiment(
        {"model": "transformer", "train.lr": 0.0021, "model.dropout": 0.05,
         "train.batch_size": 32}, tmp_path / "conf", ["a note"]))
    cfg = compose_in(["experiment=tuned"], tmp_path / "conf")
    assert (cfg.model.name, cfg.model.d_model, cfg.model.dropout) == ("transformer", 128, 0.05)
    assert (cfg.train.lr, cfg.train.batch_size) == (0.0021, 32)


def test_the_command_line_reaches_the_search(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(tune_module, "tune", lambda overrides, **kw: calls.append(
        (overrides, kw)) or {"best_value": 0.5, "best_params": {}, "best_trial": 0,
                             "trials": [], "parent_run_id": "r"})
    main(["model=lstm", "--storage", "sqlite:///s.db", "--workers", "3", "--study", "s1",
          "tune.timeout_s=60", "--trials", "7"])
    assert calls == [(["model=lstm", "tune.timeout_s=60", "tune.trials=7"],
                      {"storage": "sqlite:///s.db", "workers": 3, "study_name": "s1",
                       "verbose": False})]
    with pytest.raises(SystemExit):
        main(["--workers", "0"])
    assert "--workers must be at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------- real searches


@pytest.mark.slow
def test_tune_writes_the_best_configuration_for_the_pipeline(workspace, tmp_path):
    path, _ = workspace
    shutil.copytree(CONF, tmp_path / "conf")
    uri = tracking_in(tmp_path, "textops")
    result = tune([*TINY, f"mlflow.tracking_uri={uri}", "tune.trials=3"], Paths(path),
                  conf_dir=tmp_path / "conf", params_file=tmp_path / "params.yaml")
    assert len(result["trials"]) == 3
    assert set(result["trials"]) <= {"COMPLETE", "PRUNED"}

    client = mlflow.MlflowClient(uri)
    children = client.search_runs(
        [client.get_experiment_by_name("textops").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    assert len(children) == 3
    finished = [r for r in children if r.data.metrics.get("val_f1") is not None]
    assert max(r.data.metrics["val_f1"] for r in finished) == pytest.approx(
        result["best_value"], abs=1e-6)
    parent = client.get_run(result["parent_run_id"])
    assert parent.data.tags["best.train.lr"] == str(result["best_params"]["train.lr"])

    tuned = (tmp_path / "conf" / "experiment" / "tuned.yaml").read_text()
    assert "override /model: transformer_tiny" in tuned
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert params["train"]["lr"] == pytest.approx(result["best_params"]["train.lr"])
    assert params["train"]["batch_size"] == result["best_params"]["train.batch_size"]
    assert params["model"]["dropout"] == pytest.approx(result["best_params"]["model.dropout"])
    assert params["model"]["d_model"] == 32  # transformer_tiny
    assert params["tune"]["trials"] == 12  # the search's own overrides are not kept


@pytest.mark.slow
def test_two_worker_processes_share_one_postgresql_study(workspace, tmp_path):
    """`tune --storage postgresql://... --workers 2`, as a user runs it in a checkout:
    both processes train real trials of one study, the budget is the study's, and the
    launcher alone writes the best configuration once every worker has ended."""
    path, _ = workspace
    shutil.copytree(CONF, tmp_path / "conf")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/processed").symlink_to(path / "data/processed")
    uri = tracking_in(tmp_path, "textops")
    with postgres_server() as database, inside(tmp_path):
        command = ["--storage", database.url, "--study", "shared", "--workers", "2",
                   "--trials", "4", *TINY, f"mlflow.tracking_uri={uri}"]
        main(command)
        study = optuna.load_study(study_name="shared", storage=storage(database.url))
        done = study.get_trials(states=FINISHED)
        assert len(done) == 4 and len(study.trials) == 4  # none over, none failed
        pids = {t.user_attrs["pid"] for t in done}
        assert len(pids) == 2 and os.getpid() not in pids
        cores = len(os.sched_getaffinity(0))
        assert {t.user_attrs["torch_threads"] for t in done} == {max(1, cores // 2)}

        tuned_file = tmp_path / "conf/experiment/tuned.yaml"
        written = datetime.datetime.fromtimestamp(tuned_file.stat().st_mtime)
        assert written >= max(t.datetime_complete for t in done)  # after the last trial
        cfg = compose_in(["experiment=tuned"], tmp_path / "conf")
        best = study.best_trial
        assert f"trial {best.number} " in tuned_file.read_text()
        assert (cfg.train.lr, cfg.model.dropout, cfg.train.batch_size) == pytest.approx(
            (best.params["train.lr"], best.params["model.dropout"],
             best.params["train.batch_size"]))

        parent = study.user_attrs["mlflow_parent_run_id"]
        client = mlflow.MlflowClient(uri)
        children = client.search_runs(
            [client.get_experiment_by_name("textops").experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent}'")
        assert sorted(int(r.data.tags["tune_trial"]) for r in children) == [0, 1, 2, 3]
        assert {r.data.tags["tune_study"] for r in children} == {"shared"}

        # another machine joining once the budget is spent trains nothing more
        main(command)
        study = optuna.load_study(study_name="shared", storage=storage(database.url))
        assert len(study.trials) == 4
