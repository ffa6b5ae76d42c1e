"""Text classification's preprocess: normalise and mask text, clean the rows, split
them by group, train a tokenizer, tokenize every split, and profile and validate the
result.

Production feedback (a `feedback` split from collect) joins train, but for a seeded
slice held out by group as `feedback_test` (see `pipeline.data.feedback_split`).

Output (`data/processed/`): `dataset/` (train / val / test with `input_ids`, and
`feedback_test` when there is feedback),
`tokenizer.json` (normalisation and masking included, see
`pipeline.tasks.text_classification.tokenizer`), and
`profile.json` (see `pipeline.data.profile`). Nothing is written unless validation passes,
and the same input gives the same bytes in every run.
"""

from __future__ import annotations

import hashlib

import datasets
from datasets import DatasetDict
from omegaconf import DictConfig
from tokenizers import Tokenizer

from pipeline import atomic
from pipeline.config import Paths
from pipeline.data import grouping
from pipeline.data.cleaning import clean_split
from pipeline.data.feedback_split import merge_feedback
from pipeline.data.profile import ValidationError, validate
from pipeline.data.splits import FEEDBACK_TEST, column, load_dataset_dir
from pipeline.data.splitting import split_rows
from pipeline.tasks.text_classification.profile import build_profile
from pipeline.tasks.text_classification.tokenizer import build_normalizer, build_tokenizer


def tokenize(splits: DatasetDict, tokenizer: Tokenizer) -> DatasetDict:
    def encode(batch):
        encodings = tokenizer.encode_batch(batch["text"])
        ids = [e.ids for e in encodings]
        return {"input_ids": ids, "length": [len(i) for i in ids]}

    # The fingerprint `datasets` records is derived from the input and the tokenizer
    # alone: by default it hashes `encode` itself, module path included, so moving this
    # code would change the saved bytes.
    vocabulary = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    return DatasetDict({
        name: split.map(encode, batched=True, batch_size=2048, new_fingerprint=hashlib.sha256(
            f"{split._fingerprint}:{vocabulary}".encode()).hexdigest()[:16])
        for name, split in splits.items()})


# ---------------------------------------------------------------- the stage


def preprocess(cfg: DictConfig, seed: int, paths: Paths) -> dict:
    """Run the whole stage on `paths.raw`; write `paths.processed` atomically, only if
    validation passes."""
    datasets.disable_progress_bars()
    raw_dir = paths.raw
    raw = load_dataset_dir(raw_dir / "dataset")
    manifest = atomic.read_json(raw_dir / "manifest.json")
    label_names = raw["train"].features["label"].names

    # Clean before splitting, so that no text is in two splits.
    normalize = build_normalizer(cfg).normalize_str
    cleaning, given, normalized, held_out = {}, {}, {}, set()
    for name in ("test", "val"):  # held-out splits that the source provides
        if name in raw:
            given[name], normalized[name], cleaning[name] = clean_split(
                raw[name], normalize, held_out)
            held_out |= set(normalized[name])
    train, train_normalized, cleaning["train"] = clean_split(raw["train"], normalize, held_out)

    indices, splitting = split_rows(train, train_normalized, given,
                                    [t for name in given for t in normalized[name]], cfg, seed)
    splits = DatasetDict({name: given[name] if name in given else train.select(indices[name])
                          for name in ("train", "val", "test")})
    for name, rows in indices.items():
        normalized[name] = [train_normalized[i] for i in rows]
    empty = [name for name, ds in splits.items() if ds.num_rows == 0]
    if empty:
        raise ValidationError("; ".join(f"split {name!r} is empty after cleaning and "
                                        "splitting" for name in empty))
    feedback = None
    if "feedback" in raw and raw["feedback"].num_rows:
        splits, feedback = merge_feedback(raw["feedback"], splits, normalized, normalize,
                                          cfg, seed)
    leakage = {name: grouping.leakage(normalized[name], normalized["train"])
               for name in ("val", "test", FEEDBACK_TEST) if name in splits}

    tokenizer = build_tokenizer(column(splits["train"], "text"), cfg)
    splits = tokenize(splits, tokenizer)
    profile = build_profile(splits, tokenizer, label_names, cfg, cleaning, splitting, leakage,
                            manifest, feedback)
    validate(profile, cfg)

    with atomic.atomic_dir(paths.processed) as tmp:
        splits.save_to_disk(str(tmp / "dataset"))
        tokenizer.save(str(tmp / "tokenizer.json"))
        atomic.write_json(tmp / "profile.json", profile)
    return profile
