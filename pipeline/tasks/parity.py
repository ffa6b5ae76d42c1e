"""Classification's bundle checks, which deploy runs before anything is registered:
the saved preprocessing reproduces training's inputs, fp32 ONNX matches PyTorch, int8
agrees on labels, and an item's logits do not depend on its batch. (A task with other
outputs checks its own way: `Task.check_bundle`, e.g. next-word prediction's cached
decoding, pipeline/tasks/next_word/parity.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from serving.bundle import Bundle


class DeployError(RuntimeError):
    """A check failed: nothing was registered or promoted."""


# ---------------------------------------------------------------- checks


def check_parity(bundle_dir: Path, task, module, texts: list, ids, cfg: DictConfig) -> dict:
    """Compare the bundle with PyTorch on the test split: `texts` as a client sends
    them, `ids` as training fed them; DeployError when broken."""
    reference = task.predict_logits(module, ids, cfg.evaluate.batch_size)
    fp32 = Bundle.load(bundle_dir, "fp32")
    int8 = Bundle.load(bundle_dir, "int8")
    mismatched = [i for i, (a, b) in enumerate(zip(fp32.encode(texts), ids, strict=True))
                  if not np.array_equal(a, b)]
    fp32_diff = float(np.abs(fp32.predict_logits(texts) - reference).max())
    int8_logits = int8.predict_logits(texts)
    agreement = float((int8_logits.argmax(1) == reference.argmax(1)).mean())
    sample = texts[: min(64, len(texts))]
    report = {
        "rows": len(texts),
        "preprocessing_mismatches": len(mismatched),
        "fp32_max_abs_diff": fp32_diff,
        "int8_label_agreement": agreement,
        "int8_max_abs_diff": float(np.abs(int8_logits - reference).max()),
        "batch_invariance_max_abs_diff": {
            "fp32": batch_invariance(fp32, sample), "int8": batch_invariance(int8, sample)
        },
    }
    problems = []
    if mismatched:
        saved = " and ".join(task.spec.preprocessing)
        problems.append(f"{saved} gives other model inputs than training for "
                        f"{len(mismatched)} test rows (first: row {mismatched[0]})")
    if fp32_diff > cfg.deploy.fp32_max_abs_diff:
        problems.append(f"fp32 ONNX logits differ from PyTorch by {fp32_diff:.2e} "
                        f"(allowed {cfg.deploy.fp32_max_abs_diff:.0e})")
    if agreement < cfg.deploy.int8_min_agreement:
        problems.append(f"int8 labels agree with PyTorch on {agreement:.4f} of test rows "
                        f"(required {cfg.deploy.int8_min_agreement})")
    allowed = batch_tolerances(cfg)
    for precision, diff in report["batch_invariance_max_abs_diff"].items():
        if diff > allowed[precision]:
            problems.append(f"{precision}: a text's logits change with its batch by {diff:.2e} "
                            f"(allowed {allowed[precision]:.0e})")
    if problems:
        raise DeployError("; ".join(problems))
    return report


def batch_tolerances(cfg: DictConfig) -> dict[str, float]:
    """How far a text's logits may move between being scored alone and in a batch."""
    return {"fp32": cfg.deploy.fp32_max_abs_diff, "int8": cfg.deploy.int8_batch_max_abs_diff}


def batch_invariance(bundle: Bundle, texts: list[str]) -> float:
    """Largest logit change between a text scored alone and inside one padded batch."""
    alone = np.concatenate([bundle.run(bundle.encode([t])) for t in texts])
    together = bundle.run(bundle.encode(texts))
    return float(np.abs(alone - together).max())
