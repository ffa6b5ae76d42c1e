"""Class probabilities to what clients read: the label, its score, every class.

One place for /predict, /explain, the V2 route and the MLflow pyfunc model, so that
they cannot disagree about which label a row of probabilities means.
"""

from __future__ import annotations

import numpy as np


def prediction(names: list[str], row: list[float]) -> dict:
    """{label, score, probabilities} for one row of probabilities."""
    best = max(range(len(row)), key=row.__getitem__)  # the first of ties, as argmax
    return {"label": names[best], "score": row[best],
            "probabilities": dict(zip(names, row, strict=True))}


def predictions(names: list[str], probs: np.ndarray) -> list[dict]:
    """One prediction per row of `probs` ([texts, classes])."""
    # Python floats from one tolist(): the hot path serialises them with orjson.
    return [prediction(names, row) for row in probs.tolist()]
