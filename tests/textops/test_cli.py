"""The `textops` command: every subcommand is there with its help and examples, it works
from anywhere inside the project, and `deploy` says what it serves and when it must not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, compose
from typer.testing import CliRunner

from pipeline.config import Paths
from textops.cli import app
from textops.deploy_check import check

COMMANDS = {"run", "deploy", "undeploy", "serve", "predict", "promote", "rollback",
            "history", "retrain", "tune", "report", "label-queue", "label-import",
            "challenge", "decide", "clear-stop"}
TEXTOPS = Path(sys.executable).parent / "textops"


def test_help_lists_every_command_each_with_examples():
    runner = CliRunner()
    listed = runner.invoke(app, ["--help"], terminal_width=120)
    assert listed.exit_code == 0
    assert all(f" {name} " in listed.output for name in COMMANDS), listed.output
    for name in COMMANDS:
        own = runner.invoke(app, [name, "--help"], terminal_width=120)
        assert own.exit_code == 0, (name, own.output)
        assert "Examples" in own.output and f"textops {name}" in own.output, (name, own.output)


def test_the_installed_command_works_from_a_subdirectory():
    """The console script `make setup` installs finds the project from below its root."""
    result = subprocess.run([str(TEXTOPS), "predict", "--help"], cwd=ROOT / "conf" / "data",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--out" in result.stdout


def test_outside_a_project_it_says_so(tmp_path):
    result = subprocess.run([str(TEXTOPS), "history"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert "not inside a textops project" in result.stderr


# ---------------------------------------------------------------- deploy's verdict


def workspace(root: Path, report: dict | None, current: dict | None) -> Paths:
    paths = Paths(root)
    if report is not None:
        paths.deploy_report.parent.mkdir(parents=True, exist_ok=True)
        paths.deploy_report.write_text(json.dumps(report))
    if current is not None:
        bundle = root / "models/bundles/3"
        bundle.mkdir(parents=True)
        (bundle / "bundle.json").write_text(json.dumps(current))
        (bundle / "registry.json").write_text(json.dumps({"registry_version": "3"}))
        os.symlink("bundles/3", paths.current)
    return paths


def bundle_of(data: str, task: str = "text_classification") -> dict:
    return {"model_name": f"{data}-classifier", "version": "ab12", "task": task,
            "lineage": {"data": data}}


REFUSED = {"model_name": "files-classifier", "bundle_version": "cd34", "blessed": False,
           "reasons": ["accuracy 0.6100 < floor 0.75", "f1_macro 0.6000 < floor 0.75"]}


def test_a_refused_model_is_said_with_its_reasons_and_what_is_served(tmp_path):
    cfg = compose("data=files")
    paths = workspace(tmp_path, REFUSED, bundle_of("files"))
    verdict = check(cfg, paths)
    text = "\n".join(verdict.notices)
    assert verdict.refusal is None and verdict.refused_model
    assert "REFUSED at the gate" in text and "accuracy 0.6100 < floor 0.75" in text
    assert "Serving the champion instead: files-classifier v3 (bundle ab12" in text


def test_a_champion_of_another_data_set_is_served_only_when_asked(tmp_path):
    cfg = compose("data=files")
    paths = workspace(tmp_path, REFUSED, bundle_of("sst2"))
    refused = check(cfg, paths)
    assert refused.refusal and "another data set and model name" in refused.refusal
    assert "sst2-classifier v3" in refused.refusal and "--allow-other-data" in refused.refusal
    allowed = check(cfg, paths, allow_other_data=True)
    assert allowed.refusal is None
    assert any("serving it as asked" in line for line in allowed.notices)


def test_a_champion_of_another_task_is_refused(tmp_path):
    cfg = compose()
    paths = workspace(tmp_path, None, bundle_of("sst2", task="image_classification"))
    assert "another task" in check(cfg, paths).refusal


def test_nothing_to_serve_is_an_error_not_a_silent_success(tmp_path):
    verdict = check(compose(), workspace(tmp_path, REFUSED, None))
    assert verdict.refusal and "holds no bundle" in verdict.refusal


def test_a_promoted_model_is_served_without_warnings(tmp_path):
    report = {**REFUSED, "model_name": "sst2-classifier", "blessed": True}
    verdict = check(compose(), workspace(tmp_path, report, bundle_of("sst2")))
    assert verdict == type(verdict)()  # no notices, no refusal


@pytest.mark.parametrize("flag", ["--allow-other-data", "--no-repro"])
def test_deploy_options_exist(flag):
    assert flag in CliRunner().invoke(app, ["deploy", "--help"], terminal_width=200).output


def test_predict_writes_the_answers_of_the_batch_api(built_bundle, tmp_path):
    """`textops predict` over a file: the rows predict_file gives, with its summary line."""
    import gzip

    from serving.batch import predict_file

    bundle_dir, _ = built_bundle
    with gzip.open(ROOT / "data/external/sst2/dev.tsv.gz", "rt") as dev:
        source = tmp_path / "dev.tsv"
        source.write_text("".join(next(dev) for _ in range(41)))  # header + 40 rows
    out = tmp_path / "answers.csv"
    result = subprocess.run([str(TEXTOPS), "predict", str(source), "--out", str(out),
                             "--model", str(bundle_dir), "--workers", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "predict: 40 rows" in result.stdout
    expected = predict_file(source, tmp_path / "expected.csv", str(bundle_dir), workers=1,
                            progress=False)
    assert expected.rows == 40
    assert out.read_text() == (tmp_path / "expected.csv").read_text()

    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nfine,1\n,0\n")
    failed = subprocess.run([str(TEXTOPS), "predict", str(bad), "--out", str(tmp_path / "x.csv"),
                             "--model", str(bundle_dir)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert failed.returncode == 1 and "bad.csv:3" in failed.stderr
    assert not (tmp_path / "x.csv").exists()


def test_tune_forwards_its_options_and_overrides(monkeypatch):
    """`textops tune` brings preprocess up to date, then runs the search with its flags."""
    import pipeline.loops.tune as tuning
    from textops import pipeline_commands

    calls = []
    monkeypatch.setattr(pipeline_commands, "run_tool", lambda *cmd: calls.append(cmd))
    monkeypatch.setattr(tuning, "main", lambda argv: calls.append(tuple(argv)))
    result = CliRunner().invoke(app, ["tune", "--storage", "sqlite:///t.db", "--workers", "2",
                                      "--trials", "6", "model=lstm"])
    assert result.exit_code == 0, result.output
    assert calls == [("dvc", "repro", "preprocess"),
                     ("--storage", "sqlite:///t.db", "--workers", "2", "--trials", "6",
                      "model=lstm")]
