"""export: a language model as one cached ONNX graph, fp32 and int8.

Signature (serving/bundle/decoding.py runs it): `input_ids` int64 [batch, tokens],
`attention_mask` int64 [batch, past_tokens + tokens], `past_key_values` float32
[layers, 2, batch, heads, past_tokens, head_dim] -> `logits` float32 [batch, tokens,
vocab], `present_key_values` [layers, 2, batch, heads, past_tokens + tokens, head_dim].
The same graph takes a prompt (past_tokens 0: onnxruntime runs zero-length axes, so no
dummy past entry is needed) and each generated token (tokens 1). The LSTM's graph takes
one token per call (tokens fixed at 1): its forward is a Python loop over positions,
which an exporter unrolls to the example's length.

The int8 variant is static QDQ or dynamic int8, whichever agrees better with PyTorch's
next token (`quantize_best`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from pipeline.tasks.next_word.models import LSTMLM
from pipeline.tasks.onnx_tools import BatchReader, activation_products, drop_stack_traces
from serving.bundle.decoding import INPUTS, OUTPUTS
from serving.bundle.tensors import pad

INPUT_IDS, MASK, PAST = INPUTS
LOGITS, PRESENT = OUTPUTS


def cache_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(layers, heads, head_dim) of the model's cache, read from one forward pass."""
    with torch.no_grad():
        _, present = model(torch.ones(1, 1, dtype=torch.long))
    layers, _, _, heads, _, head_dim = present.shape
    return layers, heads, head_dim


def export_onnx(model: torch.nn.Module, path: Path, opset: int) -> None:
    """ONNX with dynamic batch, tokens and past_tokens axes, weights inside the file.

    torch.export (dynamo) keeps all three dynamic for the Transformer; for the LSTM,
    tokens is 1. (Both exporters run the LSTM; torch.export is the repository's
    default and names the cache's length axis itself.)
    """
    model.eval()
    layers, heads, head_dim = cache_shape(model)
    one_token = isinstance(model, LSTMLM)
    # Sizes of at least 2 wherever an axis is dynamic: torch.export specialises an
    # axis of 0 or 1 to a constant. Row 1 is left-padded in both its past and its new
    # tokens, so the padded case is traced too.
    batch, past, new = 2, 3, 1 if one_token else 2
    input_ids = torch.full((batch, new), 3, dtype=torch.long)
    mask = torch.ones(batch, past + new, dtype=torch.long)
    mask[1, :2] = 0
    mask[1, -new] = 0
    kv = torch.zeros(layers, 2, batch, heads, past, head_dim)
    shapes = ({0: "batch"} if one_token else {0: "batch", 1: "tokens"},
              {0: "batch", 1: "all_tokens"}, {2: "batch", 4: "past_tokens"})
    torch.onnx.export(model, (input_ids, mask, kv), str(path), dynamo=True,
                      input_names=list(INPUTS), output_names=list(OUTPUTS),
                      opset_version=opset, dynamic_shapes=shapes, external_data=False,
                      verbose=False)
    drop_stack_traces(path)
    name_all_tokens(path)


def name_all_tokens(path: Path) -> None:
    """Name the mask's and the present cache's length axis `past_tokens + tokens` in
    the file, as the signature reads (an exporter can only give it a free name)."""
    exported = onnx.load(str(path))
    graph = exported.graph
    total = "past_tokens + 1" if graph.input[0].type.tensor_type.shape.dim[1].dim_value == 1 \
        else "past_tokens + tokens"
    for value, axis in ((graph.input[1], 1), (graph.output[1], 4)):
        value.type.tensor_type.shape.dim[axis].dim_param = total
    onnx.save(exported, str(path))


# ---------------------------------------------------------------- running blocks


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_logits(model: ort.InferenceSession, rows: list[list[int]], pad_id: int,
                batch_size: int = 16, record: list | None = None) -> list[np.ndarray]:
    """Each row's logits [len(row), vocab], from an empty past: one call per batch
    (right-padded: a real position never sees a later one), or one call per position
    for a one-token graph, carrying the cache. `record` collects every call's inputs
    (static int8's calibration data)."""
    layers, _, _, heads, _, head_dim = model.get_inputs()[2].shape
    one_token = model.get_inputs()[0].shape[1] == 1
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids, mask = pad(chunk, pad_id)
        past = np.zeros((layers, 2, len(chunk), heads, 0, head_dim), np.float32)
        spans = ([(t, t + 1) for t in range(ids.shape[1])] if one_token
                 else [(0, ids.shape[1])])
        pieces = []
        for first, end in spans:
            feed = {INPUT_IDS: np.ascontiguousarray(ids[:, first:end]),
                    MASK: np.ascontiguousarray(mask[:, :end]), PAST: past}
            if record is not None:
                record.append(feed)
            logits, past = model.run(list(OUTPUTS), feed)
            pieces.append(logits)
        logits = np.concatenate(pieces, axis=1)
        out += [logits[i, :len(row)] for i, row in enumerate(chunk)]
    return out


def torch_logits(model: torch.nn.Module, rows: list[list[int]], pad_id: int,
                 batch_size: int = 16) -> list[np.ndarray]:
    """PyTorch's logits [len(row), vocab] for each row, in one uncached pass."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids, mask = pad(chunk, pad_id)
            logits = model(torch.from_numpy(ids), torch.from_numpy(mask))[0].numpy()
            out += [logits[i, :len(row)] for i, row in enumerate(chunk)]
    return out


def top1(logits: list[np.ndarray]) -> np.ndarray:
    """The most probable next token at every position of every row, in one array."""
    return np.concatenate([row.argmax(-1) for row in logits])


# ---------------------------------------------------------------- int8


def output_layer(model: Path) -> list[str]:
    """The matrix multiplications that give the logits (the tied output layer): the
    first MatMul or Gemm nodes met walking back from the `logits` output."""
    graph = onnx.load(str(model)).graph
    producer = {out: node for node in graph.node for out in node.output}
    found, todo, seen = [], [LOGITS], set()
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm"):
            found.append(node.name)
        else:
            todo += list(node.input)
    return found


def quantize_scheme(prepared: Path, int8: Path, scheme: str, calibration: list[dict]) -> None:
    """`static`: QDQ int8 of the weight matrix multiplications but the output layer,
    per-channel weights, activation scales fixed by min/max calibration. `dynamic`: int8
    weights of all of them, activation scales taken from each call's own tensors.

    Static keeps the output layer in fp32: with it quantised, the logits of a word-level
    vocabulary shift enough to change the top-1 word at about 1.3% of positions, and
    without it at 0.3%, as dynamic int8 does (d_model 256, 4 layers, 6,200 words,
    Tiny Shakespeare); it costs about 0.3 ms a step.
    `reduce_range` keeps weights to 7 bits: without VNNI (AVX2 only) the u8 x s8
    kernels accumulate pairs in int16 and saturate otherwise.
    """
    common = {"per_channel": True, "reduce_range": True, "weight_type": QuantType.QInt8,
              "op_types_to_quantize": ["MatMul", "Gemm"]}
    excluded = activation_products(prepared, ("MatMul", "Gemm"))
    if scheme == "static":
        quantize_static(str(prepared), str(int8), BatchReader(calibration),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=excluded + output_layer(prepared), **common)
    else:
        quantize_dynamic(str(prepared), str(int8), nodes_to_exclude=excluded, **common)


def quantize_best(fp32: Path, int8: Path, model: torch.nn.Module,
                  calibration: list[list[int]], check: list[list[int]], pad_id: int,
                  dynamic_margin: float = 0.005) -> dict:
    """Static QDQ int8 (calibrated on the `calibration` blocks) and dynamic int8 are
    both made and scored by how often their most probable next token is PyTorch's on
    the `check` blocks; static is kept unless dynamic agrees better by more than
    `dynamic_margin`.

    Static has the benefit of the doubt because its fixed scales keep a sequence's
    logits independent of the sequences decoded beside it (measured: 0 change), which
    continuous batching needs for a seeded sample or a greedy continuation to repeat
    under any load; dynamic scales follow each call's whole tensor, padding and
    companions included (measured: logits move by 0.02-0.03, over deploy's int8 batch
    tolerance). With the output layer in fp32 the two agree about equally (0.9967
    against 0.9974 on 11,500 positions: 8 positions apart, within the noise).
    """
    if not calibration or not check:
        raise ValueError("quantize_int8: needs calibration and check blocks")
    reference = top1(torch_logits(model, check, pad_id))
    feeds: list[dict] = []
    onnx_logits(session(fp32), calibration, pad_id, record=feeds)
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Symbolic shape inference cannot follow the exporter's dynamic shapes; the
        # ONNX shape inference and graph optimisation steps still apply.
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        for scheme in ("static", "dynamic"):
            candidate = Path(tmp) / f"{scheme}.onnx"
            quantize_scheme(prepared, candidate, scheme, feeds)
            labels = top1(onnx_logits(session(candidate), check, pad_id))
            scores[scheme] = float((labels == reference).mean())
        best = "dynamic" if scores["dynamic"] > scores["static"] + dynamic_margin else "static"
        shutil.move(Path(tmp) / f"{best}.onnx", int8)
    return {"scheme": best, "validation_top1_agreement": scores,
            "calibration_blocks": len(calibration), "check_blocks": len(check)}


def quantize_int8(fp32: Path, int8: Path, module, blocks: list[list[int]], cfg) -> dict:
    """The task's int8 step: `deploy.calibration_rows` validation blocks (seeded
    choice) calibrate, up to 256 others check."""
    order = np.random.default_rng(cfg.seed).permutation(len(blocks))
    count = max(1, min(int(cfg.deploy.calibration_rows), len(blocks) // 2))
    calibration = [blocks[i] for i in order[:count]]
    check = [blocks[i] for i in order[count:count + 256]] or calibration
    return quantize_best(fp32, int8, module.model, calibration, check, module.hparams.pad_id)
