"""The data profile that preprocess writes, and the validation rules it must pass.

`profile.json` holds, per split: rows, class balance, token lengths, truncation and
unknown-token rates; the cleaning and splitting counts; how many validation and test
rows leak from training (`pipeline.data.grouping.leakage`); and the training-split
distributions that the service later compares live traffic with (drift).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from datasets import Dataset, DatasetDict
from omegaconf import DictConfig
from tokenizers import Tokenizer

from pipeline.data.splits import column
from pipeline.tasks.text_classification.tokenizer import SPECIAL_TOKENS, UNK
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


def profile_split(ds: Dataset, label_names: list[str], unk_id: int, max_length: int) -> dict:
    lengths = np.asarray(column(ds, "length"), dtype=np.int64)
    labels = Counter(column(ds, "label"))
    unk = sum(ids.count(unk_id) for ids in column(ds, "input_ids"))
    return {
        "rows": ds.num_rows,
        "class_counts": {name: labels.get(i, 0) for i, name in enumerate(label_names)},
        "class_shares": {
            name: labels.get(i, 0) / max(ds.num_rows, 1) for i, name in enumerate(label_names)
        },
        "tokens": length_stats(lengths) if len(lengths) else {},
        "truncated_share": float((lengths >= max_length).mean()) if len(lengths) else 0.0,
        "unk_rate": unk / max(int(lengths.sum()), 1),
    }


def build_profile(
    splits: DatasetDict, tokenizer: Tokenizer, label_names: list[str], cfg: DictConfig,
    cleaning: dict, splitting: dict, leakage: dict, manifest: dict,
    feedback: dict | None = None,
) -> dict:
    """The profile; `feedback` (what merging production feedback kept, held out and
    dropped) appears only when there was feedback, so the base data's profile stays
    the same without it."""
    unk_id = tokenizer.token_to_id(UNK)
    train = splits["train"]
    counter = Counter(token for ids in column(train, "input_ids") for token in ids)
    specials = {tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    top = [(tokenizer.id_to_token(i), n) for i, n in counter.most_common() if i not in specials]
    train_lengths = np.asarray(column(train, "length"))
    class_counts = Counter(column(train, "label"))
    profile = {
        "data": {"name": manifest["name"], "content_hash": manifest["content_hash"]},
        "label_names": label_names,
        "vocab_size": tokenizer.get_vocab_size(),
        "max_length": cfg.max_length,
        "splits": {
            name: profile_split(ds, label_names, unk_id, cfg.max_length)
            for name, ds in splits.items()
        },
        "cleaning": cleaning,
        "splitting": splitting,
        "leakage": leakage,
        "top_tokens": top[:50],
        # What the service compares live traffic with (drift): train-split distributions.
        "reference": {
            "length": reference_histogram(train_lengths),
            "unk_rate": profile_split(train, label_names, unk_id, cfg.max_length)["unk_rate"],
            "class_shares": [class_counts.get(i, 0) / train.num_rows
                             for i in range(len(label_names))],
        },
    }
    if feedback is not None:
        profile["feedback"] = feedback
    return profile


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
