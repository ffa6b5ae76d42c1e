"""Per-token attributions by occlusion, for any bundle.

Each token is hidden in turn (its attention mask set to 0, so the model ignores it as
it ignores padding) and the drop in the predicted class's probability is that token's
attribution: positive where the token supports the prediction, negative where it
argues against it. The occluded copies run in batches through the bundle's own ONNX
session, so this needs nothing model-specific.
"""

from __future__ import annotations

import numpy as np

from serving.bundle import Bundle, softmax
from serving.bundle.predictions import prediction


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
