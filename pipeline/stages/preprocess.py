"""preprocess: normalise and mask text, clean the rows, split them by group, train a
tokenizer, tokenize every split, and profile and validate the result.

Production feedback (a `feedback` split from collect) joins train, but for a seeded
slice held out by group as `feedback_test` (see `merge_feedback`).

Output (`data/processed/`): `dataset/` (train / val / test with `input_ids`, and
`feedback_test` when there is feedback),
`tokenizer.json` (normalisation and masking included, see `pipeline.tasks.text_classification.tokenizer`), and
`profile.json` (see `pipeline.data.profile`). Nothing is written unless validation passes,
and the same input gives the same bytes in every run.
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict, Value, concatenate_datasets
from omegaconf import DictConfig
from tokenizers import Tokenizer

from pipeline import atomic

from pipeline.data import grouping
from pipeline.config import PROCESSED_DIR, RAW_DIR, load_params
from pipeline.data.profile import ValidationError, build_profile, validate
from pipeline.data.splits import FEEDBACK_TEST, column, load_dataset_dir
from pipeline.tasks.text_classification.tokenizer import build_normalizer, build_tokenizer

# ---------------------------------------------------------------- cleaning


def clean_split(ds: Dataset, normalize, exclude: set[str] = frozenset()
                ) -> tuple[Dataset, list[str], dict]:
    """Drop empty texts, duplicates and contradictions; count what was dropped.
    Returns the kept rows, their normalised texts and the counts.

    - empty: nothing left after normalisation;
    - conflicting_labels: the same normalised text with different labels (all dropped,
      since no label can be trusted);
    - exact_duplicates / normalized_duplicates: a repeat of a kept row, before or after
      normalisation (the first is kept);
    - overlap_with_held_out: texts also in a test or validation split that the source
      provides, dropped so that held-out scores are not inflated by memorised rows.
    """
    texts, labels = column(ds, "text"), column(ds, "label")
    normalized = [normalize(t) for t in texts]
    labels_of: dict[str, set[int]] = {}
    for text, label in zip(normalized, labels, strict=True):
        labels_of.setdefault(text, set()).add(label)
    counts = Counter()
    seen_raw, seen_norm, keep = set(), set(), []
    for i, (raw, norm) in enumerate(zip(texts, normalized, strict=True)):
        if not norm:
            counts["empty"] += 1
        elif len(labels_of[norm]) > 1:
            counts["conflicting_labels"] += 1
        elif norm in exclude:
            counts["overlap_with_held_out"] += 1
        elif raw in seen_raw:
            counts["exact_duplicates"] += 1
        elif norm in seen_norm:
            counts["normalized_duplicates"] += 1
        else:
            keep.append(i)
        seen_raw.add(raw)
        seen_norm.add(norm)
    kinds = ["empty", "exact_duplicates", "normalized_duplicates", "conflicting_labels",
             "overlap_with_held_out"]
    report = {"rows_in": ds.num_rows, **{k: counts[k] for k in kinds}, "rows_out": len(keep)}
    return ds.select(keep), [normalized[i] for i in keep], report



# ---------------------------------------------------------------- splitting


def row_groups(train: Dataset, normalized: list[str], groups: str) -> list:
    """Each training row's group: the data's own group column when it has one, else
    containment groups (`groups: containment`), else every row alone (`none`)."""
    if "group" in train.column_names:
        return column(train, "group")
    if groups == "containment":
        return grouping.containment_groups(normalized)
    if groups == "none":
        return list(range(train.num_rows))
    raise ValueError(f"preprocess.groups: {groups!r} is not one of containment, none")


def split_rows(train: Dataset, normalized: list[str], given: dict[str, Dataset],
               given_normalized: list[str], cfg: DictConfig, seed: int
               ) -> tuple[dict[str, list[int]], dict]:
    """Row indices of train for each split, and what splitting dropped.

    Held-out splits the source does not provide are carved from train by whole
    groups, stratified by label, so that no group straddles two splits. For the same
    reason, training rows are dropped that share a group with a row of a provided
    held-out split or (containment groups) hold one of its rows among their words.
    """
    groups = row_groups(train, normalized, cfg.groups)
    labels = column(train, "label")
    report = {"groups": len(set(groups)), "held_out_rows": cfg.held_out_rows}
    if "group" in train.column_names:
        held = {g for ds in given.values() for g in column(ds, "group")}
        rest = [i for i in range(train.num_rows) if groups[i] not in held]
        report["train_rows_in_a_held_out_group"] = train.num_rows - len(rest)
    elif cfg.groups == "containment":
        holding = set().union(*grouping.containers(given_normalized, normalized).values())
        rest = [i for i in range(train.num_rows) if i not in holding]
        report["train_rows_holding_a_held_out_row"] = train.num_rows - len(rest)
    else:
        rest = list(range(train.num_rows))
    indices = {}
    for name, fraction in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):
        if name in given:
            continue
        held, kept, dropped = grouping.carve(
            [groups[i] for i in rest], [normalized[i] for i in rest],
            [labels[i] for i in rest], fraction, cfg.held_out_rows, seed)
        indices[name] = [rest[i] for i in held]
        rest = [rest[i] for i in kept]
        report[f"{name}_group_members_dropped"] = dropped
    indices["train"] = rest
    return indices, report


# ---------------------------------------------------------------- production feedback


def feedback_groups(request_ids: list[str], normalized: list[str]) -> list[int]:
    """Containment groups joined by request: the texts of one request, and a text with
    those it holds or nearly repeats, are held out or trained on together."""
    parent = list(range(len(normalized)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, root in enumerate(grouping.containment_groups(normalized)):
        parent[find(i)] = find(root)
    first_row_of: dict[str, int] = {}
    for i, request in enumerate(request_ids):
        parent[find(i)] = find(first_row_of.setdefault(request, i))
    return [find(i) for i in range(len(normalized))]


def held_out_by_hash(key: str, fraction: float, seed: int) -> bool:
    """Whether `key` falls in the held-out `fraction`: the same answer for the same
    key and seed, whatever else the data holds."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def split_feedback(request_ids: list[str], texts: list[str], base: dict[str, list[str]],
                   fraction: float, seed: int
                   ) -> tuple[list[int], list[int], dict]:
    """Indices of (held out, trained on) among the feedback rows, and why the others
    were dropped. `texts` are normalised and free of repeats among themselves; `base`
    holds the base splits' normalised texts.

    A row the base data already holds (equal but for punctuation) adds nothing: dropped.
    A group with a row inside a base training row cannot be tested fairly: it trains.
    Of the other groups, about `fraction` is held out, each by a hash of its earliest
    request id; training rows that hold a held-out row (a base one or a feedback one)
    are dropped.
    """
    known = {key for rows in base.values() for text in rows if (key := grouping.near_key(text))}
    fresh = [i for i, text in enumerate(texts) if grouping.near_key(text) not in known]
    groups = feedback_groups([request_ids[i] for i in fresh], [texts[i] for i in fresh])
    inside_train = grouping.containers([texts[i] for i in fresh], base["train"])
    seen_in_training = {g for g, i in zip(groups, fresh, strict=True) if texts[i] in inside_train}
    # A group's side follows from a hash of its earliest request id, not from a draw:
    # as the snapshot grows, every earlier group stays where it was, so the champion
    # was never trained on the slice the next retraining scores it on.
    first_request: dict = {}
    for j, group in enumerate(groups):
        if group not in seen_in_training:
            request = request_ids[fresh[j]]
            first_request[group] = min(first_request.get(group, request), request)
    held_groups = {g for g, request in first_request.items()
                   if held_out_by_hash(request, fraction, seed)}
    held = sorted(fresh[j] for j, group in enumerate(groups) if group in held_groups)
    rest = sorted(set(fresh) - set(held))
    held_out_texts = base["val"] + base["test"] + [texts[i] for i in held]
    holding = set().union(*grouping.containers(held_out_texts, [texts[i] for i in rest]).values())
    train = [i for j, i in enumerate(rest) if j not in holding]
    report = {"already_in_base_data": len(texts) - len(fresh),
              "groups": len(set(groups)), "groups_inside_base_training_rows": len(seen_in_training),
              "held_out": len(held), "trained": len(train),
              "dropped_holding_a_held_out_row": len(holding)}
    return held, train, report


def merge_feedback(feedback: Dataset, splits: DatasetDict, normalized: dict[str, list[str]],
                   normalize, cfg: DictConfig, seed: int) -> tuple[DatasetDict, dict]:
    """Add the feedback's rows to train, but for a held-out slice, `feedback_test`,
    scored beside the fixed test set and never trained on. Updates `normalized`.

    Base training rows get an empty `request_id`, feedback rows the id of the answer
    they label: the provenance of every training row.
    """
    cleaned, texts, cleaning = clean_split(feedback, normalize)
    held, train, report = split_feedback(column(cleaned, "request_id"), texts, normalized,
                                         cfg.feedback_holdout, seed)
    base_train = splits["train"]
    base_train = base_train.add_column("request_id", [""] * base_train.num_rows,
                                       feature=Value("string"))
    added = cleaned.select(train).select_columns(["text", "label", "source_row", "request_id"])
    if "group" in base_train.column_names:  # a feedback row is a group of its own request
        added = added.add_column("group", [f"feedback:{r}" for r in column(added, "request_id")],
                                 feature=Value("string"))
    merged = DatasetDict(splits)
    if added.num_rows:
        base_train = concatenate_datasets([base_train, added.cast(base_train.features)])
    merged["train"] = base_train
    normalized["train"] = normalized["train"] + [texts[i] for i in train]
    if held:
        merged[FEEDBACK_TEST] = cleaned.select(held)
        normalized[FEEDBACK_TEST] = [texts[i] for i in held]
    return merged, {"rows_in": feedback.num_rows, "cleaning": cleaning, **report}


def tokenize(splits: DatasetDict, tokenizer: Tokenizer) -> DatasetDict:
    def encode(batch):
        encodings = tokenizer.encode_batch(batch["text"])
        ids = [e.ids for e in encodings]
        return {"input_ids": ids, "length": [len(i) for i in ids]}

    return splits.map(encode, batched=True, batch_size=2048)


# ---------------------------------------------------------------- the stage


def preprocess(
    cfg: DictConfig, seed: int, raw_dir: Path = RAW_DIR, out_dir: Path = PROCESSED_DIR
) -> dict:
    """Run the whole stage; write `out_dir` atomically, only if validation passes."""
    datasets.disable_progress_bars()
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

    with atomic.atomic_dir(out_dir) as tmp:
        splits.save_to_disk(str(tmp / "dataset"))
        tokenizer.save(str(tmp / "tokenizer.json"))
        atomic.write_json(tmp / "profile.json", profile)
    return profile


def main() -> None:
    cfg = load_params()
    try:
        profile = preprocess(cfg.preprocess, cfg.seed)
    except ValidationError as err:
        sys.exit(f"preprocess: validation failed: {err}")
    rows = ", ".join(f"{n} {s['rows']}" for n, s in profile["splits"].items())
    leaks = ", ".join(f"{n} {v['share']:.2%}" for n, v in profile["leakage"].items())
    print(f"preprocess: {rows} rows; vocabulary {profile['vocab_size']}; "
          f"train unknown-token rate {profile['splits']['train']['unk_rate']:.4f}; "
          f"rows leaking from train: {leaks}")


if __name__ == "__main__":
    main()
