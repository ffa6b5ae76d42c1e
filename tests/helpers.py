"""Small data builders and patterns that several test modules share."""

from __future__ import annotations

import json
import random
import re

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

FEATURES = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"]),
                     "source_row": Value("int64")})


def write_raw(path, splits: dict[str, list[tuple]]):
    """A data/raw directory as collect would write it. Rows are (text, label), or
    (text, label, group) as collect writes them when data.group_column is set."""
    grouped = any(len(row) == 3 for rows in splits.values() for row in rows)
    features = Features({**FEATURES, "group": Value("string")}) if grouped else FEATURES

    def columns(rows):
        found = {"text": [r[0] for r in rows], "label": [r[1] for r in rows],
                 "source_row": list(range(1, len(rows) + 1))}
        if grouped:
            found["group"] = [r[2] for r in rows]
        return found

    DatasetDict({name: Dataset.from_dict(columns(rows), features=features)
                 for name, rows in splits.items()}).save_to_disk(str(path / "dataset"))
    (path / "manifest.json").write_text(json.dumps({"name": "t", "content_hash": "abc"}))
    return path


WORDS = ("good great fine lovely superb awful bad dull boring weak film movie plot cast "
         "acting story").split()


def synthetic_rows(n: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(WORDS[:5] if label else WORDS[5:10], 2) + rng.sample(WORDS[10:], 3)
        rows.append((" ".join(words) + f" number{i}", label))
    return rows


# What dependencies print when left alone (pipeline/logs.py hides it): warnings, their
# INFO lines, Lightning's tips and device banner, download-style progress bars.
NOISE = re.compile(r"Warning\b|\bWARNING\b|W\d{4} \d\d:|\bINFO\b|💡|GPU available|"
                   r"Seed set to|Loading weights|it/s\]")
