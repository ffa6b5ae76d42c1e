"""How a task's models are scored on held-out data: what evaluate measures, the gate
judges and the model card shows.

evaluate (pipeline/stages/evaluate.py) knows a task's figures only through its
`Scoring` (`Task.scoring()`): classification's is here (accuracy, macro F1, ROC-AUC,
PR-AUC, calibration, the held-out feedback slice, and their plots); next-word
prediction's is pipeline/tasks/next_word/scoring.py (perplexity and top-k accuracy
beside an n-gram baseline). The gate's rules are shared; a scoring says which of its
metrics are better lower (`lower_is_better`), so that a champion margin reads the right
way round (a floor bounds from below and a ceiling from above, whatever the metric).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchmetrics.functional.classification as tm
from datasets import DatasetDict
from omegaconf import DictConfig

from pipeline.config import Paths
from pipeline.data.splits import FEEDBACK_TEST, column
from pipeline.reporting.evaluation_plots import write_plots


@dataclass
class Scored:
    """A model's metrics on the test split (and any slice beside it), and what its
    plots are drawn from."""

    metrics: dict
    plot_data: Any = None
    # what the champion must be scored on to be compared: the same rows, as a client
    # sends them (texts, image files), with their answers
    requests: dict = field(default_factory=dict)


class Scoring(ABC):
    """One task family's metrics, plots and words."""

    # metrics where a smaller value is the better model (perplexity, calibration error)
    lower_is_better: frozenset[str] = frozenset()

    @abstractmethod
    def score(self, task, module, splits: DatasetDict, paths: Paths, cfg: DictConfig
              ) -> Scored:
        """The trained module on the test split (and the feedback slice, if any)."""

    @abstractmethod
    def score_bundle(self, bundle_dir: Path, scored: Scored, cfg: DictConfig) -> dict:
        """Another model's bundle (the champion) on the rows `scored` was measured on:
        its metrics under the same names; ValueError when it cannot answer them."""

    @abstractmethod
    def write_plots(self, plots_dir: Path, scored: Scored, cfg: DictConfig) -> None:
        """Replace `plots_dir` with the plot data and pictures (DVC plots)."""

    @abstractmethod
    def logged(self, metrics: dict) -> dict[str, float]:
        """The metrics as flat MLflow metric names and numbers."""

    @abstractmethod
    def summary(self, metrics: dict) -> str:
        """evaluate's closing line."""

    @abstractmethod
    def card(self, metrics: dict) -> str:
        """The model card's metrics section (markdown)."""


# ---------------------------------------------------------------- classification


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


def predict_proba(task, module, split, batch_size: int, paths: Paths) -> np.ndarray:
    """The module's class probabilities for a split's rows, as the task feeds them."""
    logits = task.predict_logits(module, task.model_inputs(split, paths), batch_size)
    return torch.softmax(torch.from_numpy(logits), dim=-1).numpy()


def mlflow_safe(name: str) -> str:
    """MLflow metric names allow letters, digits and _-. /: class names may not."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in name)


class ClassificationScoring(Scoring):
    """Accuracy, precision, recall, F1 (macro and per class), ROC-AUC, PR-AUC, the
    expected calibration error and the confusion matrix (torchmetrics)."""

    lower_is_better = frozenset({"ece"})

    def score(self, task, module, splits, paths, cfg) -> Scored:
        test = splits["test"]
        label_names = test.features["label"].names
        labels = np.asarray(column(test, "label"))
        bins, batch = cfg.evaluate.calibration_bins, cfg.evaluate.batch_size
        probs = predict_proba(task, module, test, batch, paths)
        metrics = compute_metrics(probs, labels, label_names, bins)
        requests = {"test": (task.requests(test), labels)}
        if FEEDBACK_TEST in splits:
            held = splits[FEEDBACK_TEST]
            held_labels = np.asarray(column(held, "label"))
            metrics[FEEDBACK_TEST] = slice_metrics(
                predict_proba(task, module, held, batch, paths), held_labels, label_names)
            requests[FEEDBACK_TEST] = (task.requests(held), held_labels)
        return Scored(metrics, plot_data=(probs, labels, label_names), requests=requests)

    def score_bundle(self, bundle_dir: Path, scored: Scored, cfg: DictConfig) -> dict:
        from serving.bundle import Bundle

        bundle = Bundle.load(bundle_dir, precision="fp32")
        label_names = scored.plot_data[2]
        if bundle.label_names != label_names:
            raise ValueError(f"its classes {bundle.label_names} differ from {label_names}")
        texts, labels = scored.requests["test"]
        metrics = compute_metrics(bundle.predict_proba(texts), labels, label_names,
                                  cfg.evaluate.calibration_bins)
        if FEEDBACK_TEST in scored.requests:
            held, held_labels = scored.requests[FEEDBACK_TEST]
            metrics[FEEDBACK_TEST] = slice_metrics(bundle.predict_proba(held), held_labels,
                                                   label_names)
        return metrics

    def write_plots(self, plots_dir: Path, scored: Scored, cfg: DictConfig) -> None:
        probs, labels, label_names = scored.plot_data
        write_plots(plots_dir, probs, labels, label_names, scored.metrics,
                    cfg.evaluate.calibration_bins)

    def logged(self, metrics: dict) -> dict[str, float]:
        flat = {f"test_{k}": v for k, v in metrics.items() if isinstance(v, float)}
        for name, values in metrics["per_class"].items():
            flat.update({f"test_{metric}_{name}": values[metric]
                         for metric in ("precision", "recall", "f1")})
        if FEEDBACK_TEST in metrics:
            flat[f"{FEEDBACK_TEST}_accuracy"] = metrics[FEEDBACK_TEST]["accuracy"]
        return {mlflow_safe(k): v for k, v in flat.items()}

    def summary(self, metrics: dict) -> str:
        line = (f"accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['f1_macro']:.4f}, "
                f"ROC-AUC {metrics['roc_auc']:.4f}, ECE {metrics['ece']:.4f}")
        if FEEDBACK_TEST in metrics:
            held = metrics[FEEDBACK_TEST]
            line += (f"\nevaluate: held-out feedback: accuracy {held['accuracy']:.4f} "
                     f"({held['rows']} rows)")
        return line

    def card(self, metrics: dict) -> str:
        m = metrics
        per_class = "\n".join(
            f"| {name} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | "
            f"{v['support']} |" for name, v in m["per_class"].items())
        return (f"accuracy {m['accuracy']:.4f}, macro F1 {m['f1_macro']:.4f}, ROC-AUC "
                f"{m['roc_auc']:.4f},\nPR-AUC {m['pr_auc']:.4f}, expected calibration error "
                f"{m['ece']:.4f}.\n\n| class | precision | recall | F1 | support |\n"
                f"|---|---|---|---|---|\n{per_class}")
