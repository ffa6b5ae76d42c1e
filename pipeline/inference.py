"""inference: PyTorch logits from a training checkpoint, as evaluate and deploy read them.

Both stages score token id lists with the checkpoint's module through these two
functions, so the metrics at the gate and the parity reference at deploy come from
the same computation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.classifier import TextClassifier
from pipeline.datamodule import collate


def load_module(checkpoint: Path) -> TextClassifier:
    """The checkpoint's classifier, on the CPU."""
    return TextClassifier.load_from_checkpoint(str(checkpoint), map_location="cpu")


@torch.inference_mode()
def predict_logits(module: TextClassifier, rows: list[list[int]], batch_size: int) -> np.ndarray:
    """Logits for token id lists, batched by length, returned in the input order."""
    module.eval()
    pad_id = module.hparams.pad_id
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    logits = np.zeros((len(rows), module.hparams.num_classes), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([(rows[i], 0) for i in chunk], pad_id)
        logits[chunk] = module(batch["input_ids"], batch["attention_mask"]).float().numpy()
    return logits
