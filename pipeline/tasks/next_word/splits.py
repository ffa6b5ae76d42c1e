"""Validation and test carved from a corpus by contiguous blocks of whole documents.

Neighbouring lines of one speech, and neighbouring speeches of one scene, share
names, phrases and rhymes: drawn line by line (or document by document) at random,
validation would be made of the training text's neighbours and score what the model
memorised. So the training documents, in source order, are cut into `split_blocks`
runs of about equal words (a document belongs to the run its first word falls in,
so none is cut), and a seeded choice of whole runs becomes test (`test_fraction` of
them) and validation (`val_fraction`). A split the source gives is kept as it is.
"""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig

from pipeline.data.profile import ValidationError

HELD_OUT = ("test", "val")


def runs(words: list[int], count: int) -> list[int]:
    """Each document's run (0 .. count-1): `count` contiguous runs of about equal words."""
    total = max(sum(words), 1)
    assigned, before = [], 0
    for n in words:
        assigned.append(min(count - 1, before * count // total))
        before += n
    return assigned


def carve(words: list[int], places: list[str], given: set[str], cfg: DictConfig, seed: int
          ) -> tuple[dict[str, list[int]], dict]:
    """Document indices of train and of each held-out split the source lacks (in
    document order), and what was drawn (`splitting` in profile.json): for each held-out
    split its runs, each with where its first and last documents start ("file:line",
    `places`)."""
    count = int(cfg.split_blocks)
    wanted = {name: int(round(cfg[f"{name}_fraction"] * count)) for name in HELD_OUT
              if name not in given}
    # a split asked for (fraction > 0) gets at least one run
    wanted = {name: max(n, int(cfg[f"{name}_fraction"] > 0)) for name, n in wanted.items()}
    if count < 1 or sum(wanted.values()) >= count:
        raise ValidationError(
            f"preprocess.split_blocks: {count} runs cannot hold {sum(wanted.values())} "
            f"held-out runs ({', '.join(f'{k} {v}' for k, v in wanted.items())}) and "
            "leave one for training")
    order = np.random.default_rng(seed).permutation(count).tolist()
    drawn: dict[str, list[int]] = {}
    for name in HELD_OUT:
        if name in wanted:
            drawn[name], order = sorted(order[:wanted[name]]), order[wanted[name]:]
    owner = {run: name for name, chosen in drawn.items() for run in chosen}
    assigned = runs(words, count)
    indices: dict[str, list[int]] = {"train": [], **{name: [] for name in drawn}}
    for i, run in enumerate(assigned):
        indices[owner.get(run, "train")].append(i)
    report = {"blocks": count, "rule": "contiguous runs of whole documents"}
    for name, chosen in drawn.items():
        spans = []
        for run in chosen:
            members = [i for i, r in enumerate(assigned) if r == run]
            if members:
                spans.append({"block": run, "documents": len(members),
                              "from": places[members[0]], "to": places[members[-1]]})
        report[name] = {"blocks": spans, "documents": len(indices[name]),
                        "words": sum(words[i] for i in indices[name])}
    return indices, report
