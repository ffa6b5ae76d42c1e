"""The pipeline's pictures as PNG bytes: the confusion matrix, ROC and precision-recall
curves, the reliability (calibration) diagram, a model beside its baseline, and the
training curves.

Drawn on matplotlib's Agg canvas without pyplot, so no figure or backend is left in
global state (a stage may import this beside a notebook or a test that uses pyplot);
every figure is drawn under matplotlib's default style, whatever a matplotlibrc says,
and saved without the version stamp, so the same numbers give the same bytes: DVC
tracks these files as stage outputs.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import matplotlib.style
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# 5 x 4 inches at 100 dpi: 500 x 400 pixels, tens of kilobytes, legible in a report.
DPI = 100
SIZE = (5.0, 4.0)
WIDE = (9.0, 3.6)


def render(draw: Callable[..., None], *args, size: tuple[float, float] = SIZE) -> bytes:
    """PNG bytes of `draw(figure, *args)`."""
    with matplotlib.style.context("default"):
        figure = Figure(figsize=size, layout="constrained")
        FigureCanvasAgg(figure)
        draw(figure, *args)
        buffer = io.BytesIO()
        # no "Software: matplotlib x.y" chunk: the bytes depend on the data alone
        figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


# ---------------------------------------------------------------- evaluation


def confusion_png(matrix: Sequence[Sequence[int]], label_names: list[str]) -> bytes:
    return render(_draw_confusion, np.asarray(matrix), label_names)


def _draw_confusion(figure: Figure, matrix: np.ndarray, names: list[str]) -> None:
    ax = figure.add_subplot()
    # shares of each actual class, so a rare class's row is as readable as a common one's
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=ax, label="share of the actual class")
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, names, rotation=45 if len(names) > 3 else 0, ha="right"
                  if len(names) > 3 else "center")
    ax.set_yticks(ticks, names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"Confusion matrix ({int(matrix.sum())} test rows)")
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, str(count), ha="center", va="center",
                color="white" if shares[row, col] > 0.5 else "black")


def roc_png(roc: list[dict], auc: float, n_classes: int) -> bytes:
    return render(_draw_curve, [p["fpr"] for p in roc], [p["tpr"] for p in roc],
                  ("false positive rate", "true positive rate"),
                  _curve_title("ROC curve", "AUC", auc, n_classes), True)


def pr_png(pr: list[dict], average_precision: float, n_classes: int) -> bytes:
    return render(_draw_curve, [p["recall"] for p in pr], [p["precision"] for p in pr],
                  ("recall", "precision"),
                  _curve_title("Precision-recall curve", "AP", average_precision, n_classes),
                  False)


def _curve_title(name: str, area: str, value: float, n_classes: int) -> str:
    """With more than two classes the curve is micro-averaged over the one-vs-rest
    problems (evaluation_plots.curve_rows) while the area in metrics.json is their
    macro average: the title says so rather than pass one off as the other."""
    if n_classes == 2:
        return f"{name} ({area} {value:.3f})"
    return f"{name}, one-vs-rest micro-average\n(macro {area} {value:.3f})"


def _draw_curve(figure: Figure, x: list[float], y: list[float], labels: tuple[str, str],
                title: str, chance_diagonal: bool) -> None:
    ax = figure.add_subplot()
    ax.plot(x, y, color="tab:blue", linewidth=2)
    if chance_diagonal:
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="chance")
        ax.legend(loc="lower right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title)
    ax.grid(alpha=0.3)


def bars_png(names: list[str], values: list[float], title: str) -> bytes:
    """One horizontal bar per name (next-word prediction: a model's perplexity beside
    its n-gram baseline's)."""
    return render(_draw_bars, names, values, title)


def _draw_bars(figure: Figure, names: list[str], values: list[float], title: str) -> None:
    axes = figure.add_subplot()
    bars = axes.barh(names, values, color="tab:blue")
    axes.bar_label(bars, fmt="%.1f", padding=3)
    axes.invert_yaxis()  # the first name on top
    axes.set_xlim(0, max(values) * 1.2)
    axes.set_title(title, fontsize=9)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> dict:
    """Top-label confidence against accuracy in `n_bins` equal-width bins, binned as
    torchmetrics bins them for the expected calibration error (a bin holds
    [low, high)); a confidence of exactly 1 joins the last bin."""
    confidence = probs.max(axis=1).astype(np.float64)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(confidence, edges) - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    filled = np.maximum(count, 1)
    accuracy = np.bincount(index, correct, minlength=n_bins) / filled
    mean_confidence = np.bincount(index, confidence, minlength=n_bins) / filled
    ece = float(np.sum(np.abs(accuracy - mean_confidence) * count) / max(count.sum(), 1))
    return {"edges": edges, "count": count, "accuracy": accuracy,
            "confidence": mean_confidence, "ece": ece}


def reliability_png(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> bytes:
    return render(_draw_reliability, reliability_bins(probs, labels, n_bins))


def _draw_reliability(figure: Figure, bins: dict) -> None:
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    edges, filled = bins["edges"], bins["count"] > 0
    left, width = edges[:-1][filled], np.diff(edges)[filled]
    accuracy, confidence = bins["accuracy"][filled], bins["confidence"][filled]
    top.bar(left, accuracy, width=width, align="edge", color="tab:blue",
            edgecolor="white", label="accuracy")
    # the gap between what the model claims and what it gets, bin by bin
    top.bar(left, confidence - accuracy, bottom=accuracy, width=width, align="edge",
            color="tab:red", alpha=0.3, hatch="//", edgecolor="tab:red", label="gap")
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1,
             label="perfectly calibrated")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability diagram (ECE {bins['ece']:.4f})")
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    bottom.bar(edges[:-1], bins["count"], width=np.diff(edges), align="edge",
               color="tab:grey", edgecolor="white")
    bottom.set_xlabel("confidence (top-label probability)")
    bottom.set_ylabel("rows")


# ---------------------------------------------------------------- training


def training_curves_png(rows: list[dict]) -> bytes:
    """Losses on the left, the other metrics (accuracy, F1) on the right, per epoch;
    `rows` as pipeline.modeling.callbacks.TrainingCurves writes them."""
    return render(_draw_training_curves, rows, size=WIDE)


def _draw_training_curves(figure: Figure, rows: list[dict]) -> None:
    losses, scores = figure.subplots(1, 2)
    # the learning rate (LearningRateMonitor's lr-*) and a language model's perplexity
    # (*_ppl, exp of its loss, in the hundreds) have their own scales: the curves table
    # in the report lists them, the plot leaves them out
    names = sorted({key for row in rows for key in row
                    if key not in ("epoch", "step") and not key.startswith("lr-")
                    and not key.endswith("_ppl")})
    for name in names:
        points = [(row["epoch"], row[name]) for row in rows if name in row]
        ax = losses if name.endswith("loss") else scores
        ax.plot(*zip(*points, strict=True), marker="o",
                linestyle="--" if name.startswith("train") else "-", label=name)
    for ax, title in ((losses, "Loss"), (scores, "Accuracy and F1")):
        ax.set_title(f"{title} per epoch")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
