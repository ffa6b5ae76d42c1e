"""What evaluate draws into `reports/plots/`: the data of the confusion matrix, ROC and
precision-recall curves that DVC renders with its Vega templates (`dvc plots show`),
and PNG pictures of the same plus the reliability diagram (pipeline/reporting/
figures.py), which DVC shows as images and evaluate logs to the training run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchmetrics.functional.classification as tm

from pipeline import atomic
from pipeline.reporting import figures


def curve_rows(probs: np.ndarray, labels: np.ndarray) -> tuple[list[dict], list[dict]]:
    """ROC and precision-recall points: of the positive class for two classes, else
    micro-averaged over the one-vs-rest problems (one curve either way)."""
    p, y = torch.from_numpy(probs).float(), torch.from_numpy(labels).long()
    if p.shape[1] == 2:
        scores, targets = p[:, 1], y
    else:
        scores = p.flatten()
        targets = torch.nn.functional.one_hot(y, p.shape[1]).flatten()
    fpr, tpr, _ = tm.binary_roc(scores, targets)
    precision, recall, _ = tm.binary_precision_recall_curve(scores, targets)
    roc = [{"fpr": float(a), "tpr": float(b)} for a, b in zip(fpr, tpr, strict=True)]
    pr = [{"recall": float(r), "precision": float(q)}
          for r, q in zip(recall, precision, strict=True)]
    return roc, pr


def write_plots(plots_dir: Path, probs: np.ndarray, labels: np.ndarray, names: list[str],
                metrics: dict, calibration_bins: int) -> None:
    """Replace `plots_dir` with the test split's plot data and pictures, in one step;
    `metrics` (compute_metrics') gives the areas and the confusion matrix."""
    roc, pr = curve_rows(probs, labels)
    predicted = probs.argmax(axis=1)
    confusion = [{"actual": names[a], "predicted": names[b]}
                 for a, b in zip(labels, predicted, strict=True)]
    # named as sources.EVALUATION_IMAGES names them (the report and dvc.yaml list them)
    pictures = {
        "confusion.png": figures.confusion_png(metrics["confusion_matrix"], names),
        "roc.png": figures.roc_png(roc, metrics["roc_auc"], len(names)),
        "pr.png": figures.pr_png(pr, metrics["pr_auc"], len(names)),
        "reliability.png": figures.reliability_png(probs, labels, calibration_bins),
    }
    with atomic.atomic_dir(plots_dir) as tmp:
        atomic.write_json(tmp / "confusion.json", confusion)
        atomic.write_json(tmp / "roc.json", roc)
        atomic.write_json(tmp / "pr.json", pr)
        for name, picture in pictures.items():
            (tmp / name).write_bytes(picture)
