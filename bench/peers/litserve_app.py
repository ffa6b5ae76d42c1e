"""LitServe server for the int8 bundle: `python -m bench.peers.litserve_app`.

Runs inside build/peers/litserve/venv, started by `bench.peers.LitServePeer` with
PYTHONPATH=<repo root> and its settings in TEXTOPS_PEER_* variables. A request:

    POST /predict  {"texts": ["...", ...]}

is answered {"predictions": [{"label": "...", "probabilities": [...]}, ...]}, one per
text, in order. An image bundle takes {"images": ["<base64 PNG or JPEG>", ...]}
instead, decoded per request (in `decode_request`, as our service decodes each
request's images before batching) with the bundle's `inputs.pixels`. GET /health
answers 200 once every inference worker has loaded.

How it is configured, and why:
- Batching on: `LitAPI(max_batch_size=64, batch_timeout=0.002)` (since LitServe 0.2.x
  these are LitAPI's arguments; LitServer's are deprecated). LitServe's docs
  (Features > Batching) leave the values to the user; these are our service's (64 per
  batch, 2 ms). A batch is a list of requests: `predict` flattens their items into one
  `infer` call and splits the rows back, one list per request.
- `LitServer(accelerator="cpu", workers_per_device=cores)`: LitServer's docstring and
  its API reference (LitServer > workers_per_device): "For CPU, set to the number of
  cores available on the machine". Each inference worker is a process of its own and
  runs onnxruntime with cores // workers intra-op threads (so 1): workers x threads =
  cores.
- `run(num_api_servers=None)`: one HTTP server process per inference worker, the
  default the docs call recommended.
- `fast_queue=True`: ZeroMQ between the HTTP servers and the workers, which the
  docstring advises above 100 requests/s (the benchmark's load is far above that).
- `timeout=10` s, our service's request timeout; `log_level="warning"` (the docs'
  production choice, no per-request access log); `generate_client_file=False` (it would
  write client.py into the working directory).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import litserve as ls

from serving.bundle import Bundle, RuntimeOptions
from serving.engine.inference import infer

# Set by bench/peers/check.py only: one log line per model call, to see the batching.
LOG_BATCHES = os.environ.get("TEXTOPS_PEER_LOG_BATCHES") == "1"


def _env(name: str) -> str:
    return os.environ[f"TEXTOPS_PEER_{name}"]


class TextClassifierAPI(ls.LitAPI):
    """One bundle per inference worker; `predict` gets a batch of requests."""

    def setup(self, device):
        self.bundle = Bundle.load(Path(_env("BUNDLE")), "int8",
                                  RuntimeOptions(intra_op_threads=int(_env("THREADS"))))
        self.key = self.bundle.task.items  # "texts" or "images"

    def decode_request(self, request):
        items = request.get(self.key)
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise ValueError(f'the body must be {{"{self.key}": [strings]}}')
        if self.key == "images":  # a list of uint8 [H, W, C] arrays, not one array:
            # LitAPI's default `batch` would stack arrays
            files = [base64.b64decode(item, validate=True) for item in items]
            return list(self.bundle.inputs.pixels(files))
        return items

    def predict(self, batch):
        # With max_batch_size > 1, `batch` is the list of decoded requests (lists of
        # texts or of decoded images); the answer must be a list with one element per
        # request.
        items = [item for request in batch for item in request]
        probs, _stats = infer(self.bundle, items)
        if LOG_BATCHES:
            print(f"textops-batch texts={len(items)} requests={len(batch)}", flush=True)
        names = self.bundle.label_names
        rows = [(names[i], row.tolist()) for i, row in zip(probs.argmax(axis=1), probs,
                                                           strict=True)]
        answers, start = [], 0
        for request in batch:
            answers.append(rows[start : start + len(request)])
            start += len(request)
        return answers

    def encode_response(self, output):
        return {"predictions": [{"label": label, "probabilities": p} for label, p in output]}


def main() -> None:
    workers = int(_env("WORKERS"))
    api = TextClassifierAPI(max_batch_size=int(_env("MAX_BATCH")),
                            batch_timeout=float(_env("MAX_WAIT_S")))
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=workers,
                          timeout=float(_env("TIMEOUT_S")), fast_queue=True)
    server.run(host=_env("HOST"), port=int(_env("PORT")), num_api_servers=None,
               log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
