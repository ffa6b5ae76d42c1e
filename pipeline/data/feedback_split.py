"""Production feedback (a `feedback` split from collect, see pipeline.data.feedback)
joins train, but for a seeded slice held out by group as `feedback_test`: scored beside
the fixed test set and never trained on (`merge_feedback`).

A group's side follows from a hash of its earliest request id, so as the snapshot grows
every earlier row stays on its side (`split_feedback`).
"""

from __future__ import annotations

import hashlib

from datasets import Dataset, DatasetDict, Value, concatenate_datasets
from omegaconf import DictConfig

from pipeline.data import grouping
from pipeline.data.cleaning import clean_split
from pipeline.data.splits import FEEDBACK_TEST, column


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
