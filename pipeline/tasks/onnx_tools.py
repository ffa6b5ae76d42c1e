"""Helpers for the ONNX files every task's export writes (beside the tasks, not in
pipeline/modeling/, which imports the tasks: the folders stay layered)."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnxruntime.quantization import CalibrationDataReader

# Node metadata the exporter writes that names where the code lives: each node's
# Python stack trace (absolute source paths) and the dotted paths of the classes it
# came from (so moving a model's module would change the file).
WHERE_THE_CODE_LIVES = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.class_hierarchy",
                        "namespace")


def drop_stack_traces(path: Path) -> None:
    """Without the metadata that names where the code lives, the file depends only on
    the model: the same weights give the same bytes in any clone and after any move of
    the code (and no local paths ship in a bundle)."""
    exported = onnx.load(str(path))
    for node in exported.graph.node:
        kept = [p for p in node.metadata_props if p.key not in WHERE_THE_CODE_LIVES]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.save(exported, str(path))


class BatchReader(CalibrationDataReader):
    """Static quantisation's calibration data: prepared input batches (name -> array),
    handed to onnxruntime one at a time."""

    def __init__(self, batches: list[dict]):
        self.batches = batches
        self.position = 0

    def get_next(self) -> dict | None:
        if self.position == len(self.batches):
            return None
        self.position += 1
        return self.batches[self.position - 1]


def activation_products(model: Path, op_types: tuple[str, ...] = ("MatMul",)) -> list[str]:
    """Matrix products (`op_types` nodes) that multiply two activations, such as
    attention scores and their use: their ranges vary with every input, so fixed int8
    scales fit them badly and quantisation leaves them out."""
    graph = onnx.load(str(model)).graph
    constant = {i.name for i in graph.initializer}
    constant |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in graph.node
            if n.op_type in op_types and not any(i in constant for i in n.input)]
