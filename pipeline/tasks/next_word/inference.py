"""inference: PyTorch logits from a training checkpoint, as evaluate and deploy read them.

Both stages score token blocks with the checkpoint's module through these functions,
so the metrics at the gate and the parity reference at deploy come from the same
computation (evaluation.lm_metrics takes `logits_fn(module)`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.tasks.next_word.evaluation import LogitsFn, batches
from pipeline.tasks.next_word.lm import NextWordModule


def load_module(checkpoint: Path) -> NextWordModule:
    """The checkpoint's module, on the CPU, in eval mode."""
    module = NextWordModule.load_from_checkpoint(str(checkpoint), map_location="cpu")
    return module.eval()


def logits_fn(module: NextWordModule) -> LogitsFn:
    """The module as lm_metrics calls it: numpy ids and mask in, logits out."""
    @torch.inference_mode()
    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        training = module.training
        module.eval()
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64))
        mask = torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64))
        if bool(mask.all()):
            mask = None  # a full batch: the models' plain causal path, same logits
        try:
            return module(ids, mask).float().numpy()
        finally:
            module.train(training)  # scoring mid-training leaves training as it was
    return run


def predict_logits(module: NextWordModule, blocks: list[list[int]], batch_size: int,
                   pad_id: int | None = None) -> list[np.ndarray]:
    """Logits float32 [len(block) - 1, V] for each block's input positions (ids[:-1]),
    in order: what lm_metrics scores."""
    pad_id = module.hparams.pad_id if pad_id is None else pad_id
    run, out = logits_fn(module), []
    for ids, mask, _ in batches(blocks, batch_size, pad_id):
        logits = run(ids, mask)
        out.extend(logits[row, :int(mask[row].sum())] for row in range(len(ids)))
    return out
