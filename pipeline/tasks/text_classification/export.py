"""export: the checkpoint's model as ONNX, fp32 and static int8.

The fp32 model has dynamic batch and sequence axes. The int8 variant is made by
*static* quantisation calibrated on validation rows: dynamic quantisation picks
activation scales per batch, so a text's answer would shift with its batch
companions; fixed scales do not. Two activation schemes are tried and the one whose
labels agree best with PyTorch on held-out validation rows is kept.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from omegaconf import DictConfig
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from pipeline.tasks.onnx_tools import BatchReader, activation_products, drop_stack_traces
from pipeline.tasks.text_classification.inference import predict_logits
from serving.bundle.tasks import TASKS, TEXT_CLASSIFICATION
from serving.bundle.tensors import pad

# The signature's names, in order, as the service checks them (serving/bundle/tasks.py).
INPUTS = TASKS[TEXT_CLASSIFICATION].inputs
(LOGITS,) = TASKS[TEXT_CLASSIFICATION].outputs


def export_onnx(model: torch.nn.Module, path: Path, opset: int, pad_id: int) -> None:
    """ONNX with dynamic batch and sequence axes, weights inside the one file.

    The torch.export-based exporter is the default; a model whose graph it cannot
    keep dynamic says `onnx_exporter = "torchscript"` (the LSTM: torch.export
    specialises nn.LSTM to the example's shape).
    """
    model.eval()
    input_ids = torch.full((2, 8), pad_id + 1, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0  # trace the padded case too
    axes = {0: "batch", 1: "sequence"}
    common = {"input_names": list(INPUTS), "output_names": [LOGITS],
              "opset_version": opset}
    if getattr(model, "onnx_exporter", "dynamo") == "torchscript":
        torch.onnx.export(model, (input_ids, attention_mask), str(path), dynamo=False,
                          dynamic_axes={**dict.fromkeys(INPUTS, axes), LOGITS: {0: "batch"}},
                          **common)
        return
    torch.onnx.export(model, (input_ids, attention_mask), str(path), dynamo=True,
                      dynamic_shapes=dict.fromkeys(INPUTS, axes),
                      external_data=False, verbose=False, **common)
    drop_stack_traces(path)


class Calibration(BatchReader):
    """Padded batches of validation rows for static int8 calibration."""

    def __init__(self, rows: list[list[int]], pad_id: int, batch_size: int = 32,
                 sort: bool = True):
        if sort:
            rows = sorted(rows, key=len)  # batches of similar length, as served
        super().__init__([dict(zip(INPUTS, pad(rows[i : i + batch_size], pad_id), strict=True))
                          for i in range(0, len(rows), batch_size)])


# Activation schemes tried for int8: symmetric int8 or asymmetric uint8 (skewed
# activations, as in pre-trained encoders, fit the latter better). Both are static
# (fixed scales), so a text's answer never depends on its batch companions.
INT8_SCHEMES = {
    "symmetric": {"activation_type": QuantType.QInt8,
                  "extra_options": {"ActivationSymmetric": True}},
    "asymmetric": {"activation_type": QuantType.QUInt8, "extra_options": {}},
}


def quantize_int8(prepared: Path, int8: Path, calibration: Calibration, scheme: str) -> None:
    """Static QDQ int8 of the weight matrix multiplications, per-channel weights.

    `reduce_range` keeps weights to 7 bits: without VNNI (AVX2 only, as here) the
    u8 x s8 kernels accumulate pairs in int16 and saturate otherwise.
    """
    quantize_static(
        str(prepared), str(int8), calibration,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=True,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_exclude=activation_products(prepared),
        calibrate_method=CalibrationMethod.MinMax,
        **INT8_SCHEMES[scheme],
    )


def onnx_logits(model: Path, rows: list[list[int]], pad_id: int) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([LOGITS], batch)[0]
                           for batch in Calibration(rows, pad_id, sort=False).batches])


def length_stratified(rows: list[list[int]], count: int, seed: int, bands: int = 8
                      ) -> tuple[list[list[int]], list[list[int]]]:
    """About `count` rows spread evenly over the range of lengths, and the rest.

    Calibrating on rows as they come under-represents long texts (most SST-2 training
    phrases are short, its test sentences are not), and their activation ranges are
    then clipped; equal shares per length band cover them.
    """
    rng = np.random.default_rng(seed)
    lengths = np.array([len(r) for r in rows])
    edges = np.linspace(lengths.min(), lengths.max() + 1, bands + 1)
    chosen = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        band = np.flatnonzero((lengths >= low) & (lengths < high))
        chosen += rng.choice(band, min(len(band), count // bands), replace=False).tolist()
    taken = set(chosen)
    return [rows[i] for i in chosen], [r for i, r in enumerate(rows) if i not in taken]


def quantize_best(fp32: Path, int8: Path, module, val_rows: list[list[int]], cfg: DictConfig
                  ) -> dict:
    """Calibrate on some validation rows, compare the schemes on others, keep the one
    whose labels agree best with PyTorch."""
    pad_id = module.hparams.pad_id
    calibration_rows, rest = length_stratified(val_rows, cfg.deploy.calibration_rows, cfg.seed)
    check_rows = length_stratified(rest, 1024, cfg.seed)[0] if rest else calibration_rows
    reference = predict_logits(module, check_rows, cfg.evaluate.batch_size).argmax(1)
    agreement = {}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Symbolic shape inference cannot follow the exporter's dynamic shapes; the
        # ONNX shape inference and graph optimisation steps still apply.
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        for scheme in INT8_SCHEMES:
            candidate = Path(tmp) / f"{scheme}.onnx"
            quantize_int8(prepared, candidate, Calibration(calibration_rows, pad_id), scheme)
            labels = onnx_logits(candidate, check_rows, pad_id).argmax(1)
            agreement[scheme] = float((labels == reference).mean())
        best = max(agreement, key=agreement.get)
        shutil.move(Path(tmp) / f"{best}.onnx", int8)
    return {"scheme": best, "validation_agreement": agreement}
