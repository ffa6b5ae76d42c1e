"""End to end, in a temporary copy of the repository: `dvc repro` of the smoke
experiment through all six stages, DVC's view of it, `make deploy` / `make undeploy`,
and MLflow's own scoring server on the registered champion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import compose, copy_repo, git_init, run
from helpers import NOISE

from ops import control
from pipeline.tasks.parity import batch_tolerances
from serving.bundle import Bundle

pytestmark = pytest.mark.slow

# teacher and transfer run too, and without a teacher (the default) only say so
STAGES = ["collect", "preprocess", "teacher", "transfer", "train", "evaluate", "deploy",
          "serve"]
VENV = Path(sys.prefix)


def test_repro_runs_all_six_stages(smoke_repo):
    log = (smoke_repo / "repro.log").read_text()
    for stage in STAGES:
        assert f"Running stage '{stage}'" in log
    metrics = json.loads((smoke_repo / "reports/metrics.json").read_text())
    rows = json.loads((smoke_repo / "reports/plots/confusion.json").read_text())
    assert metrics["rows"] == len(rows) == 600  # the smoke test split: data.max_rows
    right = sum(row["actual"] == row["predicted"] for row in rows)
    assert metrics["accuracy"] == pytest.approx(right / len(rows))
    gate = json.loads((smoke_repo / "reports/gate.json").read_text())
    assert gate["blessed"]  # the smoke gate has zero floors
    deployed = json.loads((smoke_repo / "reports/deploy.json").read_text())
    assert deployed["promoted"] and registry_version(smoke_repo) == "1"
    assert os.readlink(smoke_repo / "models/current") == "bundles/1"
    served = json.loads((smoke_repo / "reports/serve.json").read_text())
    assert served["mismatches"] == 0 and served["rows"] == 50
    assert json.loads((smoke_repo / "reports/runs/serve.json").read_text())["latency_ms"]["p50"] > 0




def test_repro_says_one_readable_line_per_step_and_no_dependency_noise(smoke_repo):
    log = (smoke_repo / "repro.log").read_text()
    noisy = [line for line in log.splitlines() if NOISE.search(line)]
    assert not noisy, "\n".join(noisy[:20])
    for step in ("collect:", "preprocess:", "teacher:", "transfer:", "train:", "evaluate:",
                 "gate:", "deploy:", "serve:"):
        assert step in log


def registry_version(repo: Path) -> str:
    """The registry version the last deploy got: a fact of that run, not a DVC output."""
    return json.loads((repo / "reports/runs/deploy.json").read_text())["registry_version"]


def test_a_fresh_copy_repeats_every_output_and_dvc_lock(smoke_repo, tmp_path):
    """Bit for bit from nothing: another copy (another directory, its own empty
    registry) running the same six stages records the very same hashes in dvc.lock,
    so a fresh clone's `dvc repro` leaves `git status` clean."""
    repo = copy_repo(tmp_path / "again")
    run([sys.executable, "-m", "pipeline.config", "experiment=smoke"], repo)
    git_init(repo)
    run(["dvc", "repro"], repo, timeout=900)
    assert (repo / "dvc.lock").read_text() == (smoke_repo / "repro.lock").read_text()


def test_second_repro_is_a_no_op(smoke_repo):
    started = time.monotonic()
    result = run(["dvc", "repro"], smoke_repo)
    assert "Running stage" not in result.stdout
    assert time.monotonic() - started < 30


def test_dvc_metrics_and_plots(smoke_repo):
    metrics = run(["dvc", "metrics", "show", "--json"], smoke_repo).stdout
    shown = json.loads(metrics)
    assert "accuracy" in json.dumps(shown)
    run(["dvc", "plots", "show", "-o", "plots-html"], smoke_repo)
    html = (smoke_repo / "plots-html" / "index.html").read_text()
    for title in ("Confusion matrix", "ROC", "Precision-recall"):
        assert title in html


def test_a_train_param_change_reruns_only_train_and_after(smoke_repo):
    result = run(["dvc", "exp", "run", "-S", "experiment=smoke", "-S", "train.lr=0.002"],
                 smoke_repo, timeout=600)
    output = result.stdout + result.stderr
    for stage in ("collect", "preprocess"):
        assert f"Running stage '{stage}'" not in output
    for stage in ("train", "evaluate", "deploy", "serve"):
        assert f"Running stage '{stage}'" in output
    # the new model was judged against the champion and registered as version 2
    gate = json.loads((smoke_repo / "reports/gate.json").read_text())
    assert gate["champion"]["version"] == "1"
    assert any("vs champion v1" in reason for reason in gate["reasons"])
    assert registry_version(smoke_repo) == "2"
    assert "0.002" in run(["dvc", "exp", "show", "--csv"], smoke_repo).stdout


# (the Transformer's other sizes are the same code: tests/pipeline/test_model.py builds
# them from their configs)
@pytest.mark.parametrize("model,extra", [
    ("lstm", []),
    # the pre-trained encoder brings its own tokenizer: preprocess reruns too
    ("minilm", ["-S", "data.max_rows=300"]),
])
def test_every_model_goes_through_all_six_stages(smoke_repo, model, extra):
    result = run(["dvc", "exp", "run", "-S", "experiment=smoke", "-S", f"model={model}",
                  *extra], smoke_repo, timeout=900)
    output = result.stdout + result.stderr
    for stage in ("train", "evaluate", "deploy", "serve"):
        assert f"Running stage '{stage}'" in output, stage
    bundle = json.loads((smoke_repo / "models/candidate/bundle.json").read_text())
    assert bundle["model"]["name"] == {"lstm": "lstm", "minilm": "pretrained"}[model]
    assert bundle["parity"]["preprocessing_mismatches"] == 0
    assert (bundle["parity"]["batch_invariance_max_abs_diff"]["int8"]
            <= batch_tolerances(compose("experiment=smoke"))["int8"])
    served = json.loads((smoke_repo / "reports/serve.json").read_text())
    assert served["bundle_version"] == bundle["version"] and served["mismatches"] == 0


def test_a_student_distilled_from_a_teacher_trained_in_the_experiment(smoke_repo):
    """experiment=distill's path on smoke data: MiniLM fine-tuned as the teacher, the
    transfer set with its logits, the small Transformer trained on it (with the moving
    average of its weights, as experiment=distill trains it), then evaluated, deployed
    and served like any model."""
    result = run(["dvc", "exp", "run", "-S", "experiment=smoke", "-S", "distill.teacher=train",
                  "-S", "data.max_rows=300", "-S", "train.ema_decay=0.9"], smoke_repo,
                 timeout=900)
    output = result.stdout + result.stderr
    for stage in ("teacher", "transfer", "train", "evaluate", "deploy", "serve"):
        assert f"Running stage '{stage}'" in output, stage
    teacher = json.loads((smoke_repo / "models/teacher/teacher.json").read_text())
    assert teacher["teacher"] == "train" and teacher["model"]["name"] == "pretrained"
    assert (smoke_repo / "models/teacher/bundle/model.int8.onnx").is_file()
    transfer = json.loads((smoke_repo / "data/transfer/transfer.json").read_text())
    assert transfer["teacher_version"] == teacher["bundle_version"]
    assert transfer["augmented_rows"] > 2 * transfer["labelled_rows"] > 0
    assert "train: distilling from the transfer set" in output
    bundle = json.loads((smoke_repo / "models/candidate/bundle.json").read_text())
    assert bundle["model"]["name"] == "transformer"  # the student is what ships
    served = json.loads((smoke_repo / "reports/serve.json").read_text())
    assert served["bundle_version"] == bundle["version"] and served["mismatches"] == 0


def test_make_deploy_curl_and_undeploy(smoke_repo):
    port = control.free_port()
    make = ["make", "-o", f"{VENV}/.installed", f"VENV={VENV}", f"PORT={port}"]
    result = run([*make, "deploy"], smoke_repo, timeout=600)
    try:
        assert f"http://127.0.0.1:{port}" in result.stdout
        assert "curl" in result.stdout
        curl = subprocess.run(
            ["curl", "-s", "-X", "POST", f"http://127.0.0.1:{port}/predict",
             "-H", "Content-Type: application/json",
             "-d", '{"texts": ["a gripping, beautifully acted film"]}'],
            capture_output=True, text=True, timeout=30, check=True)
        answer = json.loads(curl.stdout)
        assert answer["predictions"][0]["label"] in ("negative", "positive")
        # the promoted bundle says which registry version, run and commit it is
        metadata = httpx.get(f"http://127.0.0.1:{port}/metadata", timeout=10).json()
        live = os.readlink(smoke_repo / "models/current").removeprefix("bundles/")
        assert metadata["registry"]["registry_version"] == live
        assert metadata["registry"]["mlflow_run_id"] and metadata["registry"]["git_commit"]
        # and which move of the champion alias put it there
        assert metadata["registry"]["episode"]["kind"] == "deploy"
        assert metadata["registry"]["episode"]["to_version"] == live
        # deploying again replaces the running service
        again = run([*make, "deploy"], smoke_repo, timeout=600)
        assert f"http://127.0.0.1:{port}" in again.stdout
    finally:
        down = run([*make, "undeploy"], smoke_repo)
    assert "stopped" in down.stdout
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=2)
    assert "nothing was running" in run([*make, "undeploy"], smoke_repo).stdout


def test_make_rollback_moves_champion_and_current_back(smoke_repo):
    import mlflow

    # A permissive gate (a gate change reruns only evaluate, deploy and serve) blesses
    # the last candidate, so there is a champion with a blessed version before it.
    run(["dvc", "exp", "run", "-S", "experiment=smoke", "-S", "gate.max_regression.accuracy=1",
         "-S", "gate.max_regression.f1_macro=1"], smoke_repo, timeout=600)
    deployed = json.loads((smoke_repo / "reports/deploy.json").read_text())
    assert deployed["promoted"]
    name, champion = deployed["model_name"], int(registry_version(smoke_repo))
    client = mlflow.MlflowClient(f"sqlite:///{smoke_repo}/mlflow.db")
    previous = max(int(v.version) for v in client.search_model_versions(f"name = '{name}'")
                   if v.tags.get("blessed") == "true" and int(v.version) < champion)

    make = ["make", "-o", f"{VENV}/.installed", f"VENV={VENV}"]
    result = run([*make, "rollback"], smoke_repo)
    assert f"champion is now v{previous}" in result.stdout
    assert os.readlink(smoke_repo / "models/current") == f"bundles/{previous}"
    assert int(client.get_model_version_by_alias(name, "champion").version) == previous
    # the audit trail lists the rollback first, with who moved the alias and why
    history = run([f"{VENV}/bin/textops", "history"], smoke_repo).stdout
    moves = history.split("moves of the aliases:")[1].strip().splitlines()
    assert f"champion: v{champion} -> v{previous}  rollback by rollback (" in moves[0]
    assert any(f"-> v{champion}  deploy by deploy (" in line for line in moves[1:])


def test_mlflow_models_serve_answers_with_the_champion(smoke_repo, tmp_path):
    port = control.free_port()
    name = json.loads((smoke_repo / "reports/deploy.json").read_text())["model_name"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db",
           "PATH": f"{VENV}/bin:{os.environ['PATH']}"}
    log = open(tmp_path / "mlflow.log", "wb")
    process = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", f"models:/{name}@champion", "--env-manager",
         "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=smoke_repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            control.wait_until(f"{url}/ping", 60, process)
        except RuntimeError as err:
            log_tail = (tmp_path / "mlflow.log").read_text()[-3000:]
            raise AssertionError(f"{err}\n{log_tail}") from None
        texts = ["a gripping, beautifully acted film", "dull and lifeless"]
        response = httpx.post(f"{url}/invocations", timeout=30, json={
            "dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}})
        assert response.status_code == 200, response.text
        rows = response.json()["predictions"]
        expected = Bundle.load(smoke_repo / "models/current", "int8").predict_proba(texts)
        for row, probs in zip(rows, expected, strict=True):
            assert row["p_positive"] == pytest.approx(float(probs[1]), abs=1e-6)
            assert row["label"] == ["negative", "positive"][int(probs.argmax())]
    finally:
        os.killpg(process.pid, 15)
        process.wait(30)
        log.close()
