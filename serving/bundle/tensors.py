"""Token id lists to model inputs: padding, and batching by length; and counting texts
by token length, for the drift reference and the live window alike.

Numpy only (no torch, no onnxruntime), so that the pipeline's export, calibration and
evaluation can import the very code the service runs instead of keeping copies.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int64, padded to the longest row; the mask is 1 on
    real tokens, so the model ignores the padding."""
    longest = max(len(row) for row in rows)
    input_ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = row
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


def in_length_order(rows: list[list[int]], batch_size: int, width: int,
                    run: Callable[[list[list[int]]], np.ndarray]) -> np.ndarray:
    """`run` over chunks of rows of similar length, the results back in input order.

    Sorting first means each chunk pads to about its own length rather than to the
    longest row of all. `run` gets at most `batch_size` rows and returns one row of
    `width` floats per row it got.
    """
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = np.zeros((len(rows), width), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        out[chunk] = run([rows[i] for i in chunk])
    return out


def length_counts(lengths, edges) -> np.ndarray:
    """Texts per token-length bin, the bins cut at `edges`: the training profile's
    reference (pipeline/data/profile.py) and the live window count the same way."""
    edges = np.asarray(edges)
    return np.bincount(np.searchsorted(edges, np.asarray(lengths), side="right"),
                       minlength=len(edges) + 1)
