"""evaluate: score the best checkpoint on the test split, then judge it at the gate.

Metrics (torchmetrics): accuracy, macro and per-class precision / recall / F1, the
confusion matrix, ROC-AUC and PR-AUC (one-vs-rest, macro-averaged, for more than two
classes) and the expected calibration error.

The gate blesses a candidate when it meets every floor in `gate.floors` and, when the
MLflow registry already holds a `champion` for this model name, falls behind it by no
more than `gate.max_regression`. The champion is scored on *this* test split through
its own served bundle, so both are judged on the same rows.

When the data holds production feedback, preprocess held a slice of it out
(`feedback_test`): both models are scored on that slice too, beside the fixed test
set. A model that learns the new domain shows it there; one that forgets the old is
still held to the fixed test set's margins; and `gate.feedback` may also bound how far
the candidate falls behind the champion on the slice.

Output: `reports/metrics.json` (DVC metrics), `reports/plots/` (confusion, ROC and PR
data, and PNGs of them and of the reliability diagram: DVC plots,
pipeline/reporting/evaluation_plots.py) and `reports/gate.json` (the verdict with every
reason); all of it is also logged to the training run in MLflow (`evaluation/`).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch
import torchmetrics.functional.classification as tm
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from pipeline import atomic, logs, tasks
from pipeline.config import Paths, load_params, tracking_uri
from pipeline.data.splits import FEEDBACK_TEST, column, load_splits
from pipeline.reporting import sources
from pipeline.reporting.evaluation_plots import write_plots
from pipeline.tracking import lineage
from pipeline.tracking.registry import CHAMPION, download_bundle
from serving.bundle import Bundle

# ---------------------------------------------------------------- metrics


def compute_metrics(probs: np.ndarray, labels: np.ndarray, label_names: list[str],
                    calibration_bins: int = 15) -> dict:
    p, y = torch.from_numpy(probs).float(), torch.from_numpy(labels).long()
    k = len(label_names)
    per_class = {
        "precision": tm.multiclass_precision(p, y, k, average=None),
        "recall": tm.multiclass_recall(p, y, k, average=None),
        "f1": tm.multiclass_f1_score(p, y, k, average=None),
    }
    support = torch.bincount(y, minlength=k)
    if k == 2:
        roc_auc = tm.binary_auroc(p[:, 1], y)
        pr_auc = tm.binary_average_precision(p[:, 1], y)
    else:
        roc_auc = tm.multiclass_auroc(p, y, k, average="macro")
        pr_auc = tm.multiclass_average_precision(p, y, k, average="macro")
    return {
        "rows": int(len(y)),
        "accuracy": float(tm.multiclass_accuracy(p, y, k, average="micro")),
        "precision_macro": float(per_class["precision"].mean()),
        "recall_macro": float(per_class["recall"].mean()),
        "f1_macro": float(per_class["f1"].mean()),
        "roc_auc": float(roc_auc),
        "pr_auc": float(pr_auc),
        "ece": float(tm.multiclass_calibration_error(p, y, k, n_bins=calibration_bins)),
        "per_class": {
            name: {
                "precision": float(per_class["precision"][i]),
                "recall": float(per_class["recall"][i]),
                "f1": float(per_class["f1"][i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": tm.multiclass_confusion_matrix(p, y, k).tolist(),
    }


def slice_metrics(probs: np.ndarray, labels: np.ndarray, label_names: list[str]) -> dict:
    """Accuracy and per-class recall on a slice that may lack a class (feedback comes
    as users send it; ROC or macro F1 would be undefined or misleading there)."""
    predicted = probs.argmax(axis=1)
    recall = {name: float((predicted[labels == i] == i).mean())
              for i, name in enumerate(label_names) if (labels == i).any()}
    return {"rows": int(len(labels)), "accuracy": float((predicted == labels).mean()),
            "recall": recall}


# ---------------------------------------------------------------- the gate


def judge(metrics: dict, gate: DictConfig, champion: dict | None) -> dict:
    """The verdict: blessed only if every check passes; every check is a reason."""
    checks = []
    for metric, floor in gate.floors.items():
        value = metrics[metric]
        checks.append({
            "rule": "floor", "metric": metric, "value": value, "threshold": floor,
            "passed": value >= floor,
            "reason": f"{metric} {value:.4f} {'>=' if value >= floor else '<'} floor {floor}",
        })
    if champion is not None and "error" in champion:
        checks.append({"rule": "champion", "passed": False,
                       "reason": f"the champion could not be scored: {champion['error']}"})
    elif champion is not None:
        for metric, margin in gate.max_regression.items():
            value, best = metrics[metric], champion["metrics"][metric]
            passed = value >= best - margin
            checks.append({
                "rule": "no_regression", "metric": metric, "value": value,
                "champion_value": best, "margin": margin, "passed": passed,
                "reason": f"{metric} {value:.4f} vs champion v{champion['version']} "
                          f"{best:.4f}: {'within' if passed else 'behind by more than'} "
                          f"the margin {margin}",
            })
    else:
        checks.append({"rule": "champion", "passed": True,
                       "reason": "no champion yet: floors only"})
    if FEEDBACK_TEST in metrics:
        checks.append(feedback_check(metrics[FEEDBACK_TEST], gate.get("feedback"), champion))
    return {
        "blessed": all(c["passed"] for c in checks),
        "reasons": [c["reason"] for c in checks],
        "checks": checks,
        "champion": champion,
    }


def feedback_check(candidate: dict, rule: DictConfig | None, champion: dict | None) -> dict:
    """The feedback slice: the candidate against the champion on the same held-out
    feedback rows; judged when `rule` gives a margin and the slice is large enough."""
    rows, value = candidate["rows"], candidate["accuracy"]
    check = {"rule": "feedback_slice", "metric": "accuracy", "value": value, "rows": rows}
    theirs = (champion or {}).get(FEEDBACK_TEST)
    if theirs is None:
        return {**check, "passed": True, "reason": f"feedback slice ({rows} rows): accuracy "
                f"{value:.4f}, no champion scored on it: reported, not judged"}
    best = theirs["accuracy"]
    said = (f"feedback slice ({rows} rows): accuracy {value:.4f} vs champion "
            f"v{champion['version']} {best:.4f} ({value - best:+.4f})")
    check["champion_value"] = best
    margin = (rule.get("max_regression") or {}).get("accuracy") if rule else None
    if margin is None:
        return {**check, "passed": True, "reason": f"{said}: reported, not judged"}
    if rows < rule.min_rows:
        return {**check, "passed": True, "reason": f"{said}: fewer than {rule.min_rows} rows, "
                "reported, not judged"}
    passed = value >= best - margin
    verdict = "within" if passed else "behind by more than"
    return {**check, "margin": margin, "passed": passed,
            "reason": f"{said}: {verdict} the margin {margin}"}


def score_champion(model_name: str, texts: list[str], labels: np.ndarray,
                   label_names: list[str], bins: int,
                   feedback: tuple[list[str], np.ndarray] | None = None) -> dict | None:
    """The registry's champion scored on these rows through its bundle, or None; on
    the held-out feedback rows too when they are given."""
    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None  # no such model or no champion alias yet
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bundle = Bundle.load(download_bundle(model_name, Path(tmp)), precision="fp32")
            if bundle.label_names != label_names:
                raise ValueError(f"its classes {bundle.label_names} differ from {label_names}")
            probs = bundle.predict_proba(texts)
            feedback_probs = bundle.predict_proba(feedback[0]) if feedback else None
    except Exception as err:  # noqa: BLE001 - any failure is reported at the gate
        return {"version": str(version.version), "error": str(err)}
    scored = {"version": str(version.version),
              "metrics": compute_metrics(probs, labels, label_names, bins)}
    if feedback:
        scored[FEEDBACK_TEST] = slice_metrics(feedback_probs, feedback[1], label_names)
    return scored


# ---------------------------------------------------------------- the stage


def evaluate(cfg: DictConfig, paths: Paths) -> tuple[dict, dict]:
    """Score `paths.checkpoint` on the test split, plot, judge and log. Returns
    (metrics, verdict)."""
    splits = load_splits(paths.processed)
    test = splits["test"]
    label_names = test.features["label"].names
    labels = np.asarray(column(test, "label"))
    task = tasks.from_config(cfg)
    module = task.load_module(paths.checkpoint)
    probs = predict_proba(task, module, test, cfg.evaluate.batch_size, paths)

    bins = cfg.evaluate.calibration_bins
    metrics = compute_metrics(probs, labels, label_names, bins)
    feedback = None
    if FEEDBACK_TEST in splits:
        held = splits[FEEDBACK_TEST]
        feedback = (task.requests(held), np.asarray(column(held, "label")))
        metrics[FEEDBACK_TEST] = slice_metrics(
            predict_proba(task, module, held, cfg.evaluate.batch_size, paths), feedback[1],
            label_names)
    mlflow.set_tracking_uri(tracking_uri(cfg))
    champion = score_champion(cfg.deploy.model_name, task.requests(test), labels,
                              label_names, bins, feedback)
    verdict = {"model_name": cfg.deploy.model_name, **judge(metrics, cfg.gate, champion)}

    atomic.write_json(paths.metrics, metrics)
    write_plots(paths.plots, probs, labels, label_names, metrics, bins)
    atomic.write_json(paths.gate, verdict)
    log_to_run(metrics, verdict, cfg.mlflow.experiment, paths)
    return metrics, verdict


def predict_proba(task, module, split, batch_size: int, paths: Paths) -> np.ndarray:
    """The module's class probabilities for a split's rows, as the task feeds them."""
    logits = task.predict_logits(module, task.model_inputs(split, paths), batch_size)
    return torch.softmax(torch.from_numpy(logits), dim=-1).numpy()


def log_to_run(metrics: dict, verdict: dict, experiment: str, paths: Paths) -> None:
    """Add the test results to the training run, so one MLflow run tells the story."""
    run_id = lineage.training_run(experiment, paths.checkpoint)
    flat = {f"test_{k}": v for k, v in metrics.items() if isinstance(v, float)}
    for name, values in metrics["per_class"].items():
        flat.update({f"test_{metric}_{name}": values[metric]
                     for metric in ("precision", "recall", "f1")})
    if FEEDBACK_TEST in metrics:
        flat[f"{FEEDBACK_TEST}_accuracy"] = metrics[FEEDBACK_TEST]["accuracy"]
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({mlflow_safe(k): v for k, v in flat.items()})
        mlflow.log_artifact(str(paths.metrics), sources.EVALUATION)
        mlflow.log_artifact(str(paths.gate), sources.EVALUATION)
        mlflow.log_artifacts(str(paths.plots), sources.EVALUATION_PLOTS)
        mlflow.set_tag("gate_blessed", str(verdict["blessed"]).lower())


def mlflow_safe(name: str) -> str:
    """MLflow metric names allow letters, digits and _-. /: class names may not."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in name)


def main() -> None:
    logs.quiet()
    metrics, verdict = evaluate(load_params(), Paths())
    print(f"evaluate: accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['f1_macro']:.4f}, "
          f"ROC-AUC {metrics['roc_auc']:.4f}, ECE {metrics['ece']:.4f}")
    if FEEDBACK_TEST in metrics:
        held = metrics[FEEDBACK_TEST]
        print(f"evaluate: held-out feedback: accuracy {held['accuracy']:.4f} "
              f"({held['rows']} rows)")
    print(f"gate: {'BLESSED' if verdict['blessed'] else 'NOT blessed'}")
    for reason in verdict["reasons"]:
        print(f"  - {reason}")


if __name__ == "__main__":
    sys.exit(main())
