"""inference: PyTorch logits from a training checkpoint, as evaluate and deploy read them.

Both stages score token id lists with the checkpoint's module through these two
functions, so the metrics at the gate and the parity reference at deploy come from
the same computation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.tasks.text_classification.classifier import TextClassifier
from serving.bundle.tensors import in_length_order, pad


def load_module(checkpoint: Path) -> TextClassifier:
    """The checkpoint's classifier, on the CPU."""
    return TextClassifier.load_from_checkpoint(str(checkpoint), map_location="cpu")


@torch.inference_mode()
def predict_logits(module: TextClassifier, rows: list[list[int]], batch_size: int) -> np.ndarray:
    """Logits for token id lists, batched by length as the service batches them,
    returned in the input order."""
    module.eval()

    def run(chunk: list[list[int]]) -> np.ndarray:
        inputs = pad(chunk, module.hparams.pad_id)
        return module(*map(torch.from_numpy, inputs)).float().numpy()

    return in_length_order(rows, batch_size, module.hparams.num_classes, run)
