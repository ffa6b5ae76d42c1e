"""Splitting the cleaned training rows into train / val / test by group, so that no
group straddles two splits (the groups and the draws are pipeline.data.grouping's).

Not to be confused with pipeline.data.splits, which reads the splits preprocess wrote.
"""

from __future__ import annotations

from datasets import Dataset
from omegaconf import DictConfig

from pipeline.data import grouping
from pipeline.data.splits import column


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
