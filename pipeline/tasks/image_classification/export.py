"""export: the checkpoint's image model as ONNX, fp32 and static int8.

The fp32 model takes normalised pixels float32 [batch, channels, height, width] (the
batch axis dynamic) and gives logits. The int8 variant is made by *static*
quantisation calibrated on validation images: fixed activation scales, so an image's
answer never depends on its batch companions, as it would with dynamic quantisation.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from pipeline.tasks.onnx_tools import BatchReader, drop_stack_traces
from serving.bundle.tasks import IMAGE_CLASSIFICATION, TASKS

# The signature's names, as the service checks them (serving/bundle/tasks.py).
(PIXELS,) = TASKS[IMAGE_CLASSIFICATION].inputs
(LOGITS,) = TASKS[IMAGE_CLASSIFICATION].outputs


def export_onnx(model: torch.nn.Module, path: Path, opset: int, channels: int, height: int,
                width: int) -> None:
    """ONNX with a dynamic batch axis, weights inside the one file.

    The torch.export-based exporter is the default; a model that cannot go through it
    says `onnx_exporter = "torchscript"`, as the text models do.
    """
    model.eval()
    # Two images, not one: torch.export would specialise a batch of 1 to a constant.
    example = (torch.zeros(2, channels, height, width),)
    common = {"input_names": [PIXELS], "output_names": [LOGITS], "opset_version": opset}
    if getattr(model, "onnx_exporter", "dynamo") == "torchscript":
        torch.onnx.export(model, example, str(path), dynamo=False,
                          dynamic_axes={PIXELS: {0: "batch"}, LOGITS: {0: "batch"}}, **common)
        return
    torch.onnx.export(model, example, str(path), dynamo=True,
                      dynamic_shapes=({0: "batch"},), external_data=False, verbose=False,
                      **common)
    drop_stack_traces(path)


class Calibration(BatchReader):
    """Batches of normalised images for static int8 calibration."""

    def __init__(self, pixels: np.ndarray, batch_size: int = 64):
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        super().__init__([{PIXELS: pixels[i:i + batch_size]}
                          for i in range(0, len(pixels), batch_size)])


def quantize_int8(fp32: Path, int8: Path, calibration: np.ndarray) -> None:
    """Static QDQ int8 of the convolutions and weight matrix multiplications,
    calibrated (min/max) on `calibration`, normalised float32 [N, C, H, W] images.

    Weights are per-channel int8; `reduce_range` keeps them to 7 bits, because without
    VNNI (AVX2 only) the u8 x s8 kernels accumulate pairs in int16 and saturate
    otherwise. Activations are asymmetric uint8: after ReLU they are all non-negative,
    and a symmetric range would waste half its steps.
    """
    if len(calibration) == 0:
        raise ValueError("quantize_int8: no calibration images")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Symbolic shape inference cannot follow the exporter's dynamic shapes; the
        # ONNX shape inference and graph optimisation steps still apply.
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(int8), Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv", "MatMul", "Gemm"],
            calibrate_method=CalibrationMethod.MinMax,
        )
