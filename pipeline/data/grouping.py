"""Which rows share a source: containment groups, splits drawn by group, and leakage.

SST-2's training split holds a sentence and many phrases cut from it, each a row with
its own label. Carving validation rows from it at random puts phrases of training
sentences into validation (88% of them, measured), so validation scores what the
model memorised. Rows are therefore grouped first and whole groups are drawn:

- a group column names each row's source (`data.group_column`), or else
- containment groups: after normalisation, a row joins the group of a longer row that
  contains it as a run of whole words, punctuation aside (so a near-duplicate joins
  too); a row no longer row contains is a group's root.

Every held-out row is then checked against the training rows: equal, contained in one
(a run of its words), or a near-duplicate (the same words once punctuation is dropped).

Texts here are already normalised (the tokenizer's normalizer), so words are the
space-separated pieces.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np

# A near-duplicate compares only letters and digits: "the film ." equals "the film".
WORD = re.compile(r"\w+")


class RunIndex:
    """Texts found by the runs of words that equal them.

    Indexed by first word and length, so a longer text only builds the runs that
    could be one of them: a handful per position, not one per length present (which
    grows with the square of the words per text on long documents).
    """

    def __init__(self, texts: Sequence[str]):
        self.rows: dict[str, list[int]] = defaultdict(list)
        self.lengths: dict[str, set[int]] = defaultdict(set)
        for i, text in enumerate(texts):
            self.rows[text].append(i)
            words = text.split(" ")
            self.lengths[words[0]].add(len(words))

    def inside(self, words: Sequence[str]) -> Iterator[tuple[str, list[int]]]:
        """(run, rows) for every shorter run of `words` that is an indexed text."""
        n = len(words)
        for start, first in enumerate(words):
            for k in self.lengths.get(first, ()):
                if k < n and start + k <= n:
                    run = " ".join(words[start : start + k])
                    if run in self.rows:
                        yield run, self.rows[run]


def containment_groups(texts: Sequence[str]) -> list[int]:
    """For each row, the index of its group's root (a root points at itself).

    Rows are compared by their words without punctuation (`near_key`). They are
    visited longest first, and each root looks its own word runs up in an index of
    all rows (`RunIndex`): for SST-2's 67k rows about a second, where comparing every
    pair would take 4.5 billion comparisons. Containment is transitive, so a row
    inside a shorter non-root row is also inside that row's root and is found there.
    A phrase found in several roots joins the longest (then the first) of them.
    """
    keys = [near_key(text) for text in texts]
    index = RunIndex(keys)
    words = [key.split(" ") for key in keys]
    group = [-1] * len(texts)
    for i in sorted(range(len(texts)), key=lambda i: (-len(words[i]), i)):
        if group[i] != -1:
            continue
        same = [(keys[i], index.rows[keys[i]])]  # rows equal but for punctuation
        for _, rows in [*same, *index.inside(words[i])]:
            for j in rows:
                if group[j] == -1:
                    group[j] = i
    return group


def group_roots(groups: Sequence, texts: Sequence[str]) -> dict:
    """Each group's root row: the one with the most words, punctuation aside (the
    first, on a tie), the measure `containment_groups` picks its roots by, so a
    containment group's root is the row no other row contains."""
    size = [len(near_key(text).split()) for text in texts]
    roots: dict = {}
    for i, group in enumerate(groups):
        best = roots.get(group)
        if best is None or size[i] > size[best]:
            roots[group] = i
    return roots


def draw_groups(groups: Sequence, roots: dict, labels: Sequence[int], fraction: float,
                seed: int) -> set:
    """About `fraction` of the groups, drawn per label of their root (stratified)."""
    by_label = defaultdict(list)
    for group, root in roots.items():
        by_label[labels[root]].append(group)
    rng = np.random.default_rng(seed)
    drawn = set()
    for label in sorted(by_label):
        members = sorted(by_label[label], key=lambda g: roots[g])  # input order, repeatable
        # at least one group of a label that has two, so no class is missing
        count = max(round(fraction * len(members)), int(fraction > 0 and len(members) > 1))
        drawn |= {members[i] for i in rng.permutation(len(members))[:count]}
    return drawn


def carve(groups: Sequence, texts: Sequence[str], labels: Sequence[int], fraction: float,
          rows: str, seed: int) -> tuple[list[int], list[int], int]:
    """Split row indices into (held out, kept for training, dropped) by group.

    `rows="all"` holds out every row of a drawn group; `rows="roots"` only each drawn
    group's root (for SST-2: whole sentences, like its test split) and drops the rest,
    which may be neither scored nor trained on. Returns the dropped count as the third.
    """
    if rows not in ("all", "roots"):
        raise ValueError(f"preprocess.held_out_rows: {rows!r} is not one of all, roots")
    roots = group_roots(groups, texts)
    drawn = draw_groups(groups, roots, labels, fraction, seed)
    root_rows = {roots[g] for g in drawn}
    held_out, kept, dropped = [], [], 0
    for i, group in enumerate(groups):
        if group not in drawn:
            kept.append(i)
        elif rows == "all" or i in root_rows:
            held_out.append(i)
        else:
            dropped += 1
    return held_out, kept, dropped


def near_key(text: str) -> str:
    return " ".join(WORD.findall(text))


def containers(held_out: Sequence[str], train: Sequence[str]) -> dict[str, list[int]]:
    """For each held-out text inside training rows (as a shorter run of their words),
    the indices of those rows."""
    index = RunIndex(held_out)
    found: dict[str, list[int]] = defaultdict(list)
    for i, text in enumerate(train):
        for run, _ in index.inside(text.split(" ")):
            found[run].append(i)
    return found


def leakage(held_out: Sequence[str], train: Sequence[str]) -> dict:
    """How many held-out rows equal, sit inside, or nearly equal a training row.

    Each row counts once, under the first kind that matches in that order; `example`
    shows one leaked row with the training row it came from.
    """
    train_set = set(train)
    container = {text: train[rows[0]] for text, rows in containers(held_out, train).items()}
    near = {key: text for text in train if (key := near_key(text))}
    kinds = {"equal": 0, "contained": 0, "near_duplicate": 0}
    example = None
    for text in held_out:
        if text in train_set:
            kind, source = "equal", text
        elif text in container:
            kind, source = "contained", container[text]
        elif near_key(text) and near_key(text) in near:
            kind, source = "near_duplicate", near[near_key(text)]
        else:
            continue
        kinds[kind] += 1
        example = example or {"kind": kind, "row": text, "train_row": source}
    leaked = sum(kinds.values())
    return {"rows": len(held_out), **kinds, "leaked": leaked,
            "share": leaked / max(len(held_out), 1), "example": example}
