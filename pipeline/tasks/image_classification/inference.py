"""inference: PyTorch logits from a training checkpoint, as evaluate and deploy read them.

Both stages score normalised pixels with the checkpoint's module through these two
functions, so the metrics at the gate and the parity reference at deploy come from
the same computation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.tasks.image_classification.classifier import ImageClassifier


def load_module(checkpoint: Path) -> ImageClassifier:
    """The checkpoint's classifier, on the CPU, in eval mode."""
    module = ImageClassifier.load_from_checkpoint(str(checkpoint), map_location="cpu")
    return module.eval()


@torch.inference_mode()
def predict_logits(module: ImageClassifier, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits float32 [N, classes] for normalised pixels float32 [N, C, H, W], in order."""
    module.eval()
    outputs = [module(torch.from_numpy(np.ascontiguousarray(pixels[i:i + batch_size],
                                                            dtype=np.float32))).float().numpy()
               for i in range(0, len(pixels), batch_size)]
    if not outputs:
        return np.zeros((0, module.hparams.num_classes), dtype=np.float32)
    return np.concatenate(outputs)
