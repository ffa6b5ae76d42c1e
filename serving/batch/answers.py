"""The model's answers as output rows, in the shape /predict gives them, flattened.

Each row: `line`, the input's fields, `label`, `score` and `p_<class>` for every class;
the values are serving/bundle/predictions.py's, as /predict answers them. Rows of a
folder of images have no `line`: their `path` field says which file each is.
"""

from __future__ import annotations

import numpy as np

from serving.batch.readers import Record
from serving.bundle.predictions import predictions


class OutputRows:
    """Output rows: the line, the input's fields, the label, its score and `p_<class>`
    for every class. An input field of one of those names is kept as `input_<name>`
    (`input_input_<name>` if that is taken too: predicting a file of predictions again
    loses nothing)."""

    def __init__(self, label_names: list[str], numbered: bool = True):
        self.label_names = label_names
        self.numbered = numbered  # False: records are files, their number says nothing
        self.reserved = {*(["line"] if numbered else []), "label", "score",
                         *(f"p_{n}" for n in label_names)}
        self.renames: dict[tuple, list[str]] = {}  # input field names -> output names

    def names(self, keys: tuple) -> list[str]:
        if keys not in self.renames:
            taken, names = self.reserved | set(keys), []
            for key in keys:
                name = key
                if key in self.reserved:
                    while name in taken:
                        name = f"input_{name}"
                    taken.add(name)
                names.append(name)
            self.renames[keys] = names
        return self.renames[keys]

    def row(self, record: Record, answer: dict) -> dict:
        row = {"line": record.line} if self.numbered else {}
        row.update(zip(self.names(tuple(record.fields)), record.fields.values(), strict=True))
        row["label"], row["score"] = answer["label"], answer["score"]
        row.update({f"p_{name}": p for name, p in answer["probabilities"].items()})
        return row

    def rows(self, records: list[Record], probs: np.ndarray) -> list[dict]:
        """One row per good record (those without a problem), probs in their order."""
        answers = iter(predictions(self.label_names, probs))
        return [self.row(r, next(answers)) for r in records if not r.problem]
