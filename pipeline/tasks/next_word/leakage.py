"""The leakage rule for a corpus: validation and test lines that repeat training text.

A held-out line leaks when, after normalisation (the tokenizer's normalizer, then its
words alone, punctuation dropped), it equals a training line or is contained, as a
run of whole words, in a training document (across its line breaks too). A model
that saw the training text can recite such a line, so its perplexity there says
little about prediction.

Only lines of at least `leakage_min_words` words are counted. Short lines repeat
in any corpus without anything having leaked: Tiny Shakespeare's speaker lines
("ROMEO:", "First Citizen:") begin every speech, and "My lord.", "Exeunt." or "I
will." occur all over the plays; counting them would make every split look leaky and
hide a real copy among them.

Counts, the share of counted lines and one example (the line, where it is, and the
training document it repeats) go into profile.json; preprocess stops above
`validation.max_leakage`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from pipeline.data.grouping import RunIndex

WORD = re.compile(r"\w+")
EXCERPT = 300  # characters of the training document shown in an example


def line_key(line: str, normalize: Callable[[str], str]) -> str:
    return " ".join(WORD.findall(normalize(line)))


def leakage(held_out: Sequence[str], held_places: Sequence[tuple[str, int]],
            train: Sequence[str], train_places: Sequence[tuple[str, int]],
            normalize: Callable[[str], str], min_words: int) -> dict:
    """Leaked lines among `held_out` documents' lines. `*_places` are each document's
    (file, first line), so an example names the lines a user can look up."""
    if min_words < 1:
        raise ValueError(f"preprocess.leakage_min_words: {min_words} (at least 1)")
    train_lines: set[str] = set()
    passages = []
    for text in train:
        keys = [line_key(line, normalize) for line in text.split("\n")]
        train_lines.update(keys)
        passages.append(" ".join(k for k in keys if k))

    lines, keys = [], []  # (document, line offset) and key of each counted line
    short = 0
    for d, text in enumerate(held_out):
        for offset, line in enumerate(text.split("\n")):
            key = line_key(line, normalize)
            if len(key.split()) >= min_words:
                lines.append((d, offset))
                keys.append(key)
            elif key:
                short += 1

    # For each leaked key, the first training document that contains it.
    index = RunIndex(keys)
    inside: dict[str, int] = {}
    for t, passage in enumerate(passages):
        if passage in index.rows:
            inside.setdefault(passage, t)
        for run, _ in index.inside(passage.split(" ")):
            inside.setdefault(run, t)

    found = {"equal": 0, "contained": 0}
    example = None
    for (d, offset), key in zip(lines, keys, strict=True):
        if key in train_lines:
            kind = "equal"
        elif key in inside:
            kind = "contained"
        else:
            continue
        found[kind] += 1
        if example is None:
            t = inside[key]  # a line equal to a training line is inside its document
            file, row = held_places[d]
            train_file, train_row = train_places[t]
            example = {"kind": kind, "line": held_out[d].split("\n")[offset],
                       "file": file, "source_row": row + offset,
                       "train_file": train_file, "train_source_row": train_row,
                       "train_text": train[t][:EXCERPT]}
    leaked = found["equal"] + found["contained"]
    return {"lines": len(lines), "short_lines_skipped": short, **found, "leaked": leaked,
            "share": leaked / max(len(lines), 1), "min_words": min_words,
            "example": example}
