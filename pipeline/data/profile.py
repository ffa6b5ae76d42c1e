"""The data profile's shared parts: length statistics, the drift reference's histogram,
and the validation rules a profile must pass (class counts, unknown-token rate, the
leakage bound). A task builds its profile (text classification's:
pipeline/tasks/text_classification/profile.py).
"""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig

from serving.bundle.tensors import length_counts


class ValidationError(ValueError):
    """The processed data has an anomaly that the configuration does not allow."""


def length_stats(lengths: np.ndarray) -> dict:
    pcts = np.percentile(lengths, [5, 25, 50, 75, 95, 99])
    stats = {f"p{p}": float(v) for p, v in zip([5, 25, 50, 75, 95, 99], pcts, strict=True)}
    return {**stats, "mean": float(lengths.mean()), "max": int(lengths.max())}


def reference_histogram(lengths: np.ndarray, bins: int = 10) -> dict:
    """Decile bins of the training lengths: the reference for length-drift PSI."""
    edges = np.unique(np.percentile(lengths, np.linspace(0, 100, bins + 1))[1:-1])
    counts = length_counts(lengths, edges)
    return {"edges": edges.tolist(), "shares": (counts / counts.sum()).tolist()}


def validate(profile: dict, cfg: DictConfig) -> None:
    """Raise ValidationError listing every configured anomaly found."""
    problems = []
    for name, split in profile["splits"].items():
        if split["rows"] == 0:
            problems.append(f"split {name!r} is empty")
            continue
        # Feedback comes as users send it: its held-out slice may lack a class.
        for label, count in split["class_counts"].items():
            if name != "feedback_test" and count < cfg.validation.min_rows_per_class:
                problems.append(
                    f"split {name!r}: class {label!r} has {count} rows "
                    f"(minimum {cfg.validation.min_rows_per_class})"
                )
        if split["unk_rate"] > cfg.validation.max_unk_rate:
            problems.append(
                f"split {name!r}: unknown-token rate {split['unk_rate']:.4f} "
                f"over the bound {cfg.validation.max_unk_rate}"
            )
    problems += [leak_problem(name, found, cfg.validation.max_leakage)
                 for name, found in profile["leakage"].items()
                 if found["share"] > cfg.validation.max_leakage]
    if problems:
        raise ValidationError("; ".join(problems))


def leak_problem(split: str, found: dict, bound: float) -> str:
    example = found["example"]
    how = {"equal": "equals", "contained": "is contained in",
           "near_duplicate": "is a near-duplicate of"}[example["kind"]]
    return (f"split {split!r}: {found['share']:.1%} of its rows ({found['leaked']} of "
            f"{found['rows']}: {found['equal']} equal, {found['contained']} contained, "
            f"{found['near_duplicate']} near-duplicate) leak from train, over the bound "
            f"{bound:.1%}; e.g. {example['row']!r} {how} training row "
            f"{example['train_row']!r}")
