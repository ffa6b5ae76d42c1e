"""MLServer custom runtime serving the int8 bundle over the V2 / Open Inference Protocol.

Runs inside build/peers/mlserver/venv, started by `bench.peers.MLServerPeer` as
`mlserver start <run dir>` with PYTHONPATH=<repo root>; that folder's settings.json and
textops/model-settings.json are written by the peer. A request:

    POST /v2/models/textops/infer
    {"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [n], "data": [...]}]}

is answered with two output tensors, "probabilities" (FP32, [n, k], row-major) and
"label" (BYTES, [n]). An image bundle takes an input named "images" instead, whose
strings are PNG or JPEG files in base64 (V2's JSON carries BYTES as strings): each
batch is decoded with the bundle's `inputs.pixels`, then scored by `infer`.

How it is configured, and why:
- Adaptive batching on: `max_batch_size` 64 (requests) and `max_batch_time` 2 ms in
  model-settings.json. MLServer leaves it off by default and says the values are to be
  found by experiment (docs: User Guide > Adaptive Batching); these are our service's
  own values (64 per batch, 2 ms), so both batch by the same numbers. MLServer's batcher
  runs in the main process, concatenates the requests' input tensors along their
  first dimension, calls `predict` once, and splits every output back by the first
  dimension, which is why the outputs here are flat and row-major.
- Inference pool: `parallel_workers` = cores, a server-wide setting since MLServer 1.5
  (docs: User Guide > Parallel Inference, whose default is one worker). The number
  follows Seldon Core 2's performance tuning guide (Performance tuning > Models >
  Inference): "adjust parallel_workers in line with the number of CPU cores". Each
  worker process loads the bundle with onnxruntime intra-op threads = cores // workers
  (so 1): workers x threads = cores, no thread oversubscription.
- `debug` false: MLServer's default (true) writes an access-log line per request.
- gRPC (always started) and the metrics server listen on free loopback ports.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from mlserver import MLModel
from mlserver.codecs import StringCodec
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

from serving.bundle import Bundle, RuntimeOptions
from serving.engine.inference import infer

# Set by bench/peers/check.py only: one log line per model call, to see the batching.
LOG_BATCHES = os.environ.get("TEXTOPS_PEER_LOG_BATCHES") == "1"


class TextClassifierRuntime(MLModel):
    """One bundle per inference worker; `predict` gets a whole adaptive batch (of texts,
    or of images for an image bundle: the class keeps its name, model-settings.json
    names it)."""

    async def load(self) -> bool:
        parameters = self.settings.parameters
        threads = int((parameters.extra or {}).get("intra_op_threads", 1))
        self._bundle = Bundle.load(Path(parameters.uri), "int8",
                                   RuntimeOptions(intra_op_threads=threads))
        self._input = self._bundle.task.items  # "texts" or "images": the tensor's name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        items = None
        for request_input in payload.inputs:
            if request_input.name == self._input:
                items = StringCodec.decode_input(request_input)
        if items is None:
            raise InferenceError(f"no input tensor named {self._input!r} (BYTES, shape [n])")
        # Blocking is fine here: this runs in an inference worker process, which
        # serves one batch at a time.
        if self._input == "images":
            try:
                files = [base64.b64decode(item, validate=True) for item in items]
                items = list(self._bundle.inputs.pixels(files))
            except ValueError as err:  # bad base64 (binascii.Error), ImageError
                raise InferenceError(f"images: {err}") from None
        probs, _stats = infer(self._bundle, items)
        if LOG_BATCHES:
            print(f"textops-batch texts={len(items)}", flush=True)
        names = self._bundle.label_names
        labels = [names[i] for i in probs.argmax(axis=1)]
        return InferenceResponse(
            model_name=self.name,
            model_version=self._bundle.version,
            outputs=[
                ResponseOutput(name="probabilities", datatype="FP32",
                               shape=list(probs.shape), data=probs.ravel().tolist()),
                ResponseOutput(name="label", datatype="BYTES", shape=[len(labels)],
                               data=labels),
            ],
        )
