"""Text classification's data profile, `profile.json`: per split, rows, class balance,
token lengths, truncation and unknown-token rates; the cleaning and splitting counts;
how many validation and test rows leak from training (`pipeline.data.grouping.leakage`);
and the training-split distributions that the service later compares live traffic
with (drift). The rules it must pass are pipeline/data/profile.py's `validate`.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from datasets import Dataset, DatasetDict
from omegaconf import DictConfig
from tokenizers import Tokenizer

from pipeline.data.profile import length_stats, reference_histogram
from pipeline.data.splits import column
from pipeline.tasks.text_classification.tokenizer import SPECIAL_TOKENS, UNK


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
