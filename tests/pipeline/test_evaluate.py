"""evaluate: the metrics, the DVC metrics and plots, the gate, and MLflow logging."""

from __future__ import annotations

import copy
import json
import shutil

import mlflow
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from pipeline.config import Paths
from pipeline.data.splits import column, load_splits
from pipeline.reporting.evaluation_plots import curve_rows
from pipeline.stages import evaluate as stage
from pipeline.stages.evaluate import judge
from pipeline.tasks.scoring import compute_metrics
from pipeline.tasks.text_classification.task import TextClassification
from pipeline.tracking import lineage


def random_predictions(n: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), labels] += 1.5  # better than chance, not perfect
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs.astype(np.float32), labels


@pytest.mark.parametrize("k", [2, 4])
def test_metrics_match_scikit_learn(k):
    probs, labels = random_predictions(500, k)
    names = [f"c{i}" for i in range(k)]
    m = compute_metrics(probs, labels, names)
    predicted = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, predicted), abs=1e-6)
    assert m["f1_macro"] == pytest.approx(f1_score(labels, predicted, average="macro"), abs=1e-5)
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted)
    for i, name in enumerate(names):
        assert m["per_class"][name]["precision"] == pytest.approx(precision[i], abs=1e-5)
        assert m["per_class"][name]["recall"] == pytest.approx(recall[i], abs=1e-5)
        assert m["per_class"][name]["support"] == support[i]
    assert m["confusion_matrix"] == confusion_matrix(labels, predicted).tolist()
    if k == 2:
        assert m["roc_auc"] == pytest.approx(roc_auc_score(labels, probs[:, 1]), abs=1e-5)
        assert m["pr_auc"] == pytest.approx(average_precision_score(labels, probs[:, 1]),
                                            abs=1e-4)
    else:
        assert m["roc_auc"] == pytest.approx(
            roc_auc_score(labels, probs, multi_class="ovr", average="macro"), abs=1e-4)
    # calibration error: perfect confidence on correct answers is 0; this is not
    assert 0 < m["ece"] < 1


def test_curves_are_monotone_and_complete():
    probs, labels = random_predictions(300, 3)
    roc, pr = curve_rows(probs, labels)
    fpr = [p["fpr"] for p in roc]
    assert fpr == sorted(fpr) and fpr[0] == 0 and fpr[-1] == 1
    assert {"recall", "precision"} == set(pr[0])


GATE = OmegaConf.create({"floors": {"accuracy": 0.8, "f1_macro": 0.7},
                         "max_regression": {"accuracy": 0.01}})


def test_gate_floors_and_no_champion():
    verdict = judge({"accuracy": 0.85, "f1_macro": 0.84}, GATE, None)
    assert verdict["blessed"]
    assert verdict["reasons"][-1] == "no champion yet: floors only"
    verdict = judge({"accuracy": 0.79, "f1_macro": 0.84}, GATE, None)
    assert not verdict["blessed"]
    assert "accuracy 0.7900 < floor 0.8" in verdict["reasons"]


def test_gate_against_a_champion():
    champion = {"version": "3", "metrics": {"accuracy": 0.86, "f1_macro": 0.85}}
    within = judge({"accuracy": 0.851, "f1_macro": 0.84}, GATE, champion)
    assert within["blessed"]
    behind = judge({"accuracy": 0.849, "f1_macro": 0.84}, GATE, champion)
    assert not behind["blessed"]
    assert any("champion v3 0.8600: behind by more than the margin 0.01" in r
               for r in behind["reasons"])
    broken = judge({"accuracy": 0.9, "f1_macro": 0.9}, GATE, {"version": "3", "error": "gone"})
    assert not broken["blessed"]  # a champion that cannot be scored blocks, not waves through


def test_gate_reads_a_lower_is_better_metric_the_right_way_round():
    """Perplexity: a ceiling bounds it from above, and a champion margin allows it to
    rise by at most the margin (next-word prediction's gate)."""
    gate = OmegaConf.create({"floors": {"accuracy": 0.1}, "ceilings": {"perplexity": 150},
                             "max_regression": {"perplexity": 2.0}})
    lower = frozenset({"perplexity"})
    assert judge({"accuracy": 0.2, "perplexity": 149.0}, gate, None, lower)["blessed"]
    over = judge({"accuracy": 0.2, "perplexity": 151.0}, gate, None, lower)
    assert not over["blessed"] and "perplexity 151.0000 > ceiling 150" in over["reasons"][1]
    champion = {"version": "4", "metrics": {"accuracy": 0.2, "perplexity": 100.0}}
    assert judge({"accuracy": 0.2, "perplexity": 101.9}, gate, champion, lower)["blessed"]
    assert not judge({"accuracy": 0.2, "perplexity": 102.1}, gate, champion, lower)["blessed"]
    # better by a lot is no regression (read as higher-is-better, it would be)
    assert judge({"accuracy": 0.2, "perplexity": 60.0}, gate, champion, lower)["blessed"]


def test_stage_outputs_and_mlflow(workspace):
    path, cfg = workspace
    metrics = json.loads((path / "reports/metrics.json").read_text())
    assert metrics["rows"] == 60 and set(metrics["per_class"]) == {"neg", "pos"}
    gate = json.loads((path / "reports/gate.json").read_text())
    assert gate["model_name"] == "synthetic-classifier"
    assert len(gate["checks"]) == len(cfg.gate.floors) + 1  # each floor, and the champion
    confusion = json.loads((path / "reports/plots/confusion.json").read_text())
    assert len(confusion) == 60 and set(confusion[0]) == {"actual", "predicted"}
    assert (path / "reports/plots/roc.json").exists() and (path / "reports/plots/pr.json").exists()

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    run_id = lineage.training_run(cfg.mlflow.experiment, path / "models/checkpoints/best.ckpt")
    run = mlflow.MlflowClient(cfg.mlflow.tracking_uri).get_run(run_id)
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"])
    assert "test_f1_pos" in run.data.metrics
    assert run.data.tags["gate_blessed"] == str(gate["blessed"]).lower()
    plots = {a.path for a in mlflow.MlflowClient(cfg.mlflow.tracking_uri).list_artifacts(
        run_id, "evaluation/plots")}
    assert {f"evaluation/plots/{name}" for name in ("confusion.png", "reliability.png")} <= plots


@pytest.fixture
def known_predictions(workspace, tmp_path, monkeypatch):
    """A directory holding the workspace's test split (30 neg, 30 pos rows) and a
    fresh MLflow run, with the model replaced by known logits: every row right, except
    the first 15 positive rows, which are called negative. Every answer carries the
    same confidence, sigmoid(2). Yields (paths, cfg)."""
    source, cfg = workspace
    shutil.copytree(source / "data/processed", tmp_path / "data/processed")
    paths = Paths(tmp_path)
    cfg = copy.deepcopy(cfg)
    cfg.mlflow.tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg.mlflow.experiment = "known"
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    experiment = client.create_experiment("known", (tmp_path / "mlruns").as_uri())
    paths.checkpoint.parent.mkdir(parents=True)
    # a checkpoint of a fit without differential privacy; the run that trained it is
    # found by hash
    torch.save({"state_dict": {}, "callbacks": {}}, paths.checkpoint)
    client.create_run(experiment, tags={lineage.CHECKPOINT_TAG: lineage.digest(paths.checkpoint)})

    labels = np.asarray(column(load_splits(paths.processed)["test"], "label"))
    assert np.bincount(labels).tolist() == [30, 30]
    predicted = labels.copy()
    predicted[np.flatnonzero(labels == 1)[:15]] = 0
    logits = np.zeros((60, 2), np.float32)
    logits[np.arange(60), predicted] = 2.0
    # the task's model, replaced by one whose answers are known
    monkeypatch.setattr(TextClassification, "load_module", lambda self, checkpoint: checkpoint)
    monkeypatch.setattr(TextClassification, "predict_logits",
                        lambda self, module, rows, batch_size: logits)
    return paths, cfg


def test_stage_scores_known_predictions_exactly(known_predictions):
    paths, cfg = known_predictions
    cfg.gate.floors = {"accuracy": 0.75, "f1_macro": 0.7}
    metrics, verdict = stage.evaluate(cfg, paths)
    assert json.loads(paths.metrics.read_text()) == metrics
    confidence = 1 / (1 + np.exp(-2.0))
    assert metrics["rows"] == 60
    assert metrics["confusion_matrix"] == [[30, 0], [15, 15]]
    assert metrics["accuracy"] == pytest.approx(45 / 60, abs=1e-6)
    assert metrics["per_class"]["neg"] == pytest.approx(
        {"precision": 30 / 45, "recall": 1.0, "f1": 0.8, "support": 30}, abs=1e-6)
    assert metrics["per_class"]["pos"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 30}, abs=1e-6)
    assert metrics["f1_macro"] == pytest.approx((0.8 + 2 / 3) / 2, abs=1e-6)
    # positives score sigmoid(2) or 1 - sigmoid(2), negatives always 1 - sigmoid(2):
    # half the positives beat every negative, the other half tie with them
    assert metrics["roc_auc"] == pytest.approx(0.5 + 0.5 * 0.5, abs=1e-6)
    assert metrics["pr_auc"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.5, abs=1e-6)
    # one confidence for every row, right on 75 % of them
    assert metrics["ece"] == pytest.approx(confidence - 0.75, abs=1e-6)
    # the floors exactly met pass
    assert verdict["blessed"] is True
    assert verdict["reasons"] == ["accuracy 0.7500 >= floor 0.75", "f1_macro 0.7333 >= floor 0.7",
                                  "no champion yet: floors only"]
    assert json.loads(paths.gate.read_text())["blessed"] is True


def test_stage_gate_blocks_below_a_floor(known_predictions):
    paths, cfg = known_predictions
    cfg.gate.floors = {"accuracy": 0.76, "f1_macro": 0.7}
    _, verdict = stage.evaluate(cfg, paths)
    assert verdict["blessed"] is False
    assert verdict["reasons"][0] == "accuracy 0.7500 < floor 0.76"
    gate = json.loads(paths.gate.read_text())
    assert gate["blessed"] is False and gate["checks"][0]["passed"] is False
    run_id = lineage.training_run("known", paths.checkpoint)
    run = mlflow.MlflowClient(cfg.mlflow.tracking_uri).get_run(run_id)
    assert run.data.tags["gate_blessed"] == "false"
    assert run.data.metrics["test_accuracy"] == pytest.approx(0.75)


# ---------------------------------------------------------------- the feedback slice

FEEDBACK_GATE = OmegaConf.create({**OmegaConf.to_container(GATE),
                                  "feedback": {"min_rows": 30,
                                               "max_regression": {"accuracy": 0.02}}})


def with_slice(accuracy, f1, slice_accuracy, rows=100):
    return {"accuracy": accuracy, "f1_macro": f1,
            "feedback_test": {"rows": rows, "accuracy": slice_accuracy, "recall": {}}}


def test_gate_recognises_a_model_that_learns_the_new_domain():
    champion = {"version": "3", **{"metrics": {"accuracy": 0.86, "f1_macro": 0.85}},
                "feedback_test": {"rows": 100, "accuracy": 0.55, "recall": {}}}
    learned = judge(with_slice(0.86, 0.85, 0.93), FEEDBACK_GATE, champion)
    assert learned["blessed"]
    assert ("feedback slice (100 rows): accuracy 0.9300 vs champion v3 0.5500 (+0.3800): "
            "within the margin 0.02") in learned["reasons"]
    # better on the new domain but forgetting the old: the fixed test set blocks it
    forgot = judge(with_slice(0.80, 0.85, 0.97), FEEDBACK_GATE, champion)
    assert not forgot["blessed"]
    assert [c["rule"] for c in forgot["checks"] if not c["passed"]] == ["no_regression"]


def test_gate_bounds_a_regression_on_the_feedback_slice_once_it_is_large_enough():
    champion = {"version": "3", "metrics": {"accuracy": 0.86, "f1_macro": 0.85},
                "feedback_test": {"rows": 100, "accuracy": 0.90, "recall": {}}}
    worse = judge(with_slice(0.87, 0.85, 0.85), FEEDBACK_GATE, champion)
    assert not worse["blessed"]
    assert worse["checks"][-1]["rule"] == "feedback_slice"
    assert worse["reasons"][-1].endswith("behind by more than the margin 0.02")
    small = judge(with_slice(0.87, 0.85, 0.85, rows=20), FEEDBACK_GATE, champion)
    assert small["blessed"]
    assert small["reasons"][-1].endswith("fewer than 30 rows, reported, not judged")
    unjudged = OmegaConf.merge(FEEDBACK_GATE, {"feedback": {"max_regression": None}})
    assert judge(with_slice(0.87, 0.85, 0.85), unjudged, champion)["blessed"]


def test_stage_scores_the_held_out_feedback_beside_the_test_set(known_predictions, monkeypatch):
    from datasets import DatasetDict

    paths, cfg = known_predictions
    cfg.gate.floors = {"accuracy": 0.7}
    splits = dict(load_splits(paths.processed))
    held = splits["test"].select(range(40))  # 20 neg, 20 pos rows as a stand-in slice
    splits["feedback_test"] = held
    DatasetDict(splits).save_to_disk(str(paths.root / "processed-new"))
    shutil.rmtree(paths.processed / "dataset")
    (paths.root / "processed-new").rename(paths.processed / "dataset")
    test_logits = TextClassification().predict_logits(None, None, None)
    slice_labels = np.asarray(column(held, "label"))
    slice_logits = np.zeros((40, 2), np.float32)
    slice_logits[np.arange(40), 1] = 2.0  # everything called positive
    monkeypatch.setattr(TextClassification, "predict_logits",
                        lambda self, module, rows, batch_size:
                        test_logits if len(rows) == 60 else slice_logits)

    metrics, verdict = stage.evaluate(cfg, paths)
    expected = float((slice_labels == 1).mean())
    assert metrics["rows"] == 60 and metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["feedback_test"] == {"rows": 40, "accuracy": pytest.approx(expected),
                                        "recall": {"neg": 0.0, "pos": 1.0}}
    assert json.loads(paths.metrics.read_text())["feedback_test"]["rows"] == 40
    assert verdict["blessed"]
    assert verdict["reasons"][-1] == (f"feedback slice (40 rows): accuracy {expected:.4f}, "
                                      "no champion scored on it: reported, not judged")
    run_id = lineage.training_run("known", paths.checkpoint)
    run = mlflow.MlflowClient(cfg.mlflow.tracking_uri).get_run(run_id)
    assert run.data.metrics["feedback_test_accuracy"] == pytest.approx(expected)
