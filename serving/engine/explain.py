"""Why the model gave its label, by occlusion, for any bundle: per token for a text,
per cell of a grid for an image.

- Text: each token is hidden in turn (its attention mask set to 0, so the model
  ignores it as it ignores padding) and the drop in the predicted class's probability
  is that token's attribution: positive where the token supports the prediction,
  negative where it argues against it.
- Image: a grid of cells (about 7x7 by default) is laid over the model's input and
  each cell in turn is painted gray, that is set to the spec's mean (zero after
  normalisation, so the patch carries no signal); the drop in the predicted class's
  probability is the cell's saliency. The image and all its occluded copies run as
  one batch, so the label and the drops come from the same model call.

Everything runs through the bundle's own ONNX session, so this needs nothing
model-specific.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from serving.bundle import Bundle, softmax
from serving.bundle.images import ImageSpec
from serving.bundle.predictions import prediction
from serving.errors import ApiError

CELLS = 7  # the default grid: about CELLS x CELLS cells over the image
# Floats in one occlusion batch (128 MiB) that a small `cell_size` may ask for; the
# default grid is always allowed, whatever the model's input size.
MAX_VALUES = 1 << 25


def explain_item(bundle: Bundle, item: str | np.ndarray, cell_size: int | None = None
                 ) -> dict:
    """A text's or an image's explanation by the bundle that runs it (a reload may
    have swapped in a model of the other kind while the request waited)."""
    if isinstance(item, str) != (bundle.task.items == "texts"):
        raise ApiError(503, "model_changed", f"the model now served takes "
                       f"{bundle.task.items}; send the request again",
                       headers={"Retry-After": "1"})
    if isinstance(item, str):
        return explain(bundle, item)
    return explain_image(bundle, item, cell_size)


def explain(bundle: Bundle, text: str, batch_size: int = 64) -> dict:
    """{label, score, probabilities, tokens}: the prediction for `text` and each
    token's attribution with its character offsets."""
    encoding = bundle.tokenizer.encode(text)
    ids = np.asarray(encoding.ids, dtype=np.int64)
    mask = np.ones_like(ids)
    probs = softmax(bundle.run_arrays(ids[None], mask[None]))[0]
    predicted = int(probs.argmax())
    positions = [i for i, special in enumerate(encoding.special_tokens_mask) if not special]

    occluded = np.empty(len(positions), dtype=np.float32)
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        masks = np.tile(mask, (len(chunk), 1))
        masks[np.arange(len(chunk)), chunk] = 0
        inputs = np.tile(ids, (len(chunk), 1))
        occluded[start : start + len(chunk)] = softmax(bundle.run_arrays(inputs, masks))[
            :, predicted]

    tokens = [
        {"token": encoding.tokens[i], "start": encoding.offsets[i][0],
         "end": encoding.offsets[i][1], "attribution": float(probs[predicted] - occluded[k])}
        for k, i in enumerate(positions)
    ]
    return {**prediction(bundle.label_names, probs.tolist()), "tokens": tokens}


@dataclass(frozen=True)
class Grid:
    """Cells over the model's input, row by row; the last row and column may be
    narrower where the size does not divide evenly."""

    rows: int
    cols: int
    cell_height: int
    cell_width: int

    def cells(self):
        """(row, col, rows slice, cols slice) of every cell, row by row."""
        for r in range(self.rows):
            for c in range(self.cols):
                yield (r, c, slice(r * self.cell_height, (r + 1) * self.cell_height),
                       slice(c * self.cell_width, (c + 1) * self.cell_width))


def grid(spec: ImageSpec, cell_size: int | None = None) -> Grid:
    """Square cells of `cell_size` pixels of the model's input (clipped to the
    image), or the default grid; ValueError when the batch would be too large."""
    height = min(cell_size, spec.height) if cell_size else -(-spec.height // CELLS)
    width = min(cell_size, spec.width) if cell_size else -(-spec.width // CELLS)
    cells = Grid(-(-spec.height // height), -(-spec.width // width), height, width)
    per_image = spec.channels * spec.height * spec.width
    allowed = max(CELLS * CELLS, MAX_VALUES // per_image - 1)
    if cells.rows * cells.cols > allowed:
        raise ValueError(f"{cell_size} gives {cells.rows}x{cells.cols} cells over the "
                         f"{spec.height}x{spec.width} input; at most {allowed} cells")
    return cells


def explain_image(bundle: Bundle, pixels: np.ndarray, cell_size: int | None = None) -> dict:
    """{label, score, probabilities, saliency} for one image (uint8 [H, W, C]): the
    prediction and, per cell, the drop in the label's probability without it."""
    spec = bundle.inputs.spec
    cells = grid(spec, cell_size)
    # converted to this bundle's spec (a no-op for pixels decoded for it)
    image = spec.normalise(bundle.inputs.pixels([pixels]))[0]
    copies = np.repeat(image[None], cells.rows * cells.cols + 1, axis=0)
    for k, (_, _, rows, cols) in enumerate(cells.cells(), start=1):
        copies[k, :, rows, cols] = 0.0  # the mean, normalised
    probs = softmax(bundle.run(list(copies)))
    predicted = int(probs[0].argmax())
    drops = probs[0, predicted].astype(np.float64) - probs[1:, predicted]
    # + 0.0 turns a rounded -0.0 into 0.0
    values = (np.round(drops, 6) + 0.0).reshape(cells.rows, cells.cols).tolist()
    return {**prediction(bundle.label_names, probs[0].tolist()),
            "saliency": {**asdict(cells), "values": values}}
