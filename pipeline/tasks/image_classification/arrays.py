"""Images in and out of `datasets`: a split's `pixels` column as one uint8 array.

Splits hold images as `Array3D(height, width, channels)` uint8. Reading them through
`with_format("numpy")` gives int64 arrays row by row (8x the memory, ~1 s for 54,000
small images); through Arrow the column is one flat buffer, reshaped in ~50 ms.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from datasets import Array3D, ClassLabel, Dataset, Features, Value


def features(shape: tuple[int, int, int], label_names: list[str]) -> Features:
    """A split's columns: the converted image, its label, its group (the manifest's,
    or empty where the source names none) and its row in the source."""
    return Features({"pixels": Array3D(shape=shape, dtype="uint8"),
                     "label": ClassLabel(names=label_names),
                     "group": Value("string"),
                     "source_row": Value("int64")})


def to_dataset(pixels: np.ndarray, labels: np.ndarray, groups: list[str],
               rows: np.ndarray, label_names: list[str]) -> Dataset:
    return Dataset.from_dict(
        {"pixels": pixels, "label": labels, "group": groups, "source_row": rows},
        features=features(tuple(pixels.shape[1:]), label_names))


def pixels(split: Dataset) -> np.ndarray:
    """uint8 [rows, height, width, channels], in the split's order."""
    shape = split.features["pixels"].shape
    if split.num_rows == 0:
        return np.zeros((0, *shape), dtype=np.uint8)
    column = split.with_format("arrow")[:]["pixels"]  # a selection's rows, materialised
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    flat = column.storage
    while pa.types.is_list(flat.type) or pa.types.is_fixed_size_list(flat.type):
        flat = flat.flatten()
    return flat.to_numpy(zero_copy_only=False).astype(np.uint8, copy=False).reshape(
        (-1, *shape))
