"""evaluate: score the best checkpoint on the test split, then judge it at the gate.

The metrics are the task's (`Task.scoring()`, pipeline/tasks/scoring.py). For
classification (torchmetrics): accuracy, macro and per-class precision / recall / F1,
the confusion matrix, ROC-AUC and PR-AUC (one-vs-rest, macro-averaged, for more than
two classes) and the expected calibration error; for next-word prediction: perplexity
and top-1 / top-5 accuracy beside a Kneser-Ney n-gram baseline on the same text.

The gate blesses a candidate when it meets every floor in `gate.floors` (and ceiling
in `gate.ceilings`) and, when the MLflow registry already holds a `champion` for this
model name, falls behind it by no more than `gate.max_regression`. The champion is
scored on *this* test split through its own served bundle, so both are judged on the
same rows.

When the data holds production feedback, preprocess held a slice of it out
(`feedback_test`): both models are scored on that slice too, beside the fixed test
set. A model that learns the new domain shows it there; one that forgets the old is
still held to the fixed test set's margins; and `gate.feedback` may also bound how far
the candidate falls behind the champion on the slice.

Output: `reports/metrics.json` (DVC metrics), `reports/plots/` (for classification,
confusion, ROC and PR data, and PNGs of them and of the reliability diagram: DVC
plots, pipeline/reporting/evaluation_plots.py) and `reports/gate.json` (the verdict with every
reason); all of it is also logged to the training run in MLflow (`evaluation/`).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from pipeline import atomic, logs, tasks
from pipeline.config import Paths, load_params, tracking_uri
from pipeline.data.splits import FEEDBACK_TEST, load_splits
from pipeline.reporting import sources
from pipeline.tasks.scoring import Scored, Scoring
from pipeline.tracking import lineage, privacy
from pipeline.tracking.registry import CHAMPION, download_bundle

# ---------------------------------------------------------------- the gate


def judge(metrics: dict, gate: DictConfig, champion: dict | None,
          lower_is_better: frozenset[str] = frozenset()) -> dict:
    """The verdict: blessed only if every check passes; every check is a reason.
    `gate.floors` bound metrics from below, `gate.ceilings` (when set) from above;
    a champion margin is read the way its metric improves (`lower_is_better`)."""
    checks = []
    for metric, floor in gate.floors.items():
        value = metrics[metric]
        checks.append({
            "rule": "floor", "metric": metric, "value": value, "threshold": floor,
            "passed": value >= floor,
            "reason": f"{metric} {value:.4f} {'>=' if value >= floor else '<'} floor {floor}",
        })
    for metric, ceiling in (gate.get("ceilings") or {}).items():
        value = metrics[metric]
        checks.append({
            "rule": "ceiling", "metric": metric, "value": value, "threshold": ceiling,
            "passed": value <= ceiling,
            "reason": f"{metric} {value:.4f} {'<=' if value <= ceiling else '>'} "
                      f"ceiling {ceiling}",
        })
    if gate.get("max_epsilon") is not None:
        checks.append(privacy_check(metrics.get("privacy"), gate.max_epsilon))
    if champion is not None and "error" in champion:
        checks.append({"rule": "champion", "passed": False,
                       "reason": f"the champion could not be scored: {champion['error']}"})
    elif champion is not None:
        for metric, margin in gate.max_regression.items():
            value, best = metrics[metric], champion["metrics"][metric]
            passed = (value <= best + margin if metric in lower_is_better
                      else value >= best - margin)
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


def privacy_check(record: dict | None, max_epsilon: float) -> dict:
    """The privacy bound: a model trained without differential privacy never passes."""
    if record is None:
        return {"rule": "privacy", "metric": "epsilon", "value": None,
                "threshold": max_epsilon, "passed": False,
                "reason": f"not trained with differential privacy (train.privacy or "
                          f"trainer.federated.privacy), and the gate asks for epsilon <= "
                          f"{max_epsilon}"}
    epsilon = record["epsilon"]
    passed = epsilon <= max_epsilon
    return {"rule": "privacy", "metric": "epsilon", "value": epsilon,
            "threshold": max_epsilon, "passed": passed,
            "reason": f"epsilon {epsilon:.3f} (delta {record['delta']:.1e}) "
                      f"{'<=' if passed else '>'} max_epsilon {max_epsilon}"}


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


def score_champion(model_name: str, scoring: Scoring, scored: Scored, cfg: DictConfig
                   ) -> dict | None:
    """The registry's champion scored through its own bundle on the rows `scored` was
    measured on, or None when there is no champion."""
    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None  # no such model or no champion alias yet
    try:
        with tempfile.TemporaryDirectory() as tmp:
            metrics = scoring.score_bundle(download_bundle(model_name, Path(tmp)), scored, cfg)
    except Exception as err:  # noqa: BLE001 - any failure is reported at the gate
        return {"version": str(version.version), "error": str(err)}
    champion = {"version": str(version.version), "metrics": metrics}
    if FEEDBACK_TEST in metrics:  # judged beside the test set (feedback_check)
        champion[FEEDBACK_TEST] = metrics.pop(FEEDBACK_TEST)
    return champion


# ---------------------------------------------------------------- the stage


def evaluate(cfg: DictConfig, paths: Paths) -> tuple[dict, dict]:
    """Score `paths.checkpoint` on the test split, plot, judge and log. Returns
    (metrics, verdict)."""
    task = tasks.from_config(cfg)
    scoring = task.scoring()
    module = task.load_module(paths.checkpoint)
    scored = scoring.score(task, module, load_splits(paths.processed), paths, cfg)
    if (record := privacy.spent(paths.checkpoint)) is not None:
        scored.metrics["privacy"] = record  # the epsilon these very weights spent
    if (federated := privacy.federated(paths.checkpoint)) is not None:
        scored.metrics["federated"] = federated  # where its training data stayed
        if federated.get("privacy") and "privacy" not in scored.metrics:
            scored.metrics["privacy"] = federated["privacy"]  # client-level DP
    mlflow.set_tracking_uri(tracking_uri(cfg))
    champion = score_champion(cfg.deploy.model_name, scoring, scored, cfg)
    verdict = {"model_name": cfg.deploy.model_name,
               **judge(scored.metrics, cfg.gate, champion, scoring.lower_is_better)}

    atomic.write_json(paths.metrics, scored.metrics)
    scoring.write_plots(paths.plots, scored, cfg)
    atomic.write_json(paths.gate, verdict)
    flat = scoring.logged(scored.metrics)
    if record is not None:
        flat["epsilon"] = record["epsilon"]
    log_to_run(flat, verdict, cfg.mlflow.experiment, paths)
    return scored.metrics, verdict


def log_to_run(flat: dict[str, float], verdict: dict, experiment: str, paths: Paths) -> None:
    """Add the test results to the training run, so one MLflow run tells the story."""
    run_id = lineage.training_run(experiment, paths.checkpoint)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(flat)
        mlflow.log_artifact(str(paths.metrics), sources.EVALUATION)
        mlflow.log_artifact(str(paths.gate), sources.EVALUATION)
        mlflow.log_artifacts(str(paths.plots), sources.EVALUATION_PLOTS)
        mlflow.set_tag("gate_blessed", str(verdict["blessed"]).lower())


def main() -> None:
    logs.quiet()
    cfg = load_params()
    metrics, verdict = evaluate(cfg, Paths())
    print(f"evaluate: {tasks.from_config(cfg).scoring().summary(metrics)}")
    print(f"gate: {'BLESSED' if verdict['blessed'] else 'NOT blessed'}")
    for reason in verdict["reasons"]:
        print(f"  - {reason}")


if __name__ == "__main__":
    sys.exit(main())
