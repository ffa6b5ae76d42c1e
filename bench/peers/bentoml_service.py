"""BentoML service for the int8 bundle, served by
`bentoml serve bench.peers.bentoml_service:TextClassifier --working-dir <repo root>`.

Runs inside build/peers/bentoml/venv, started by `bench.peers.BentoMLPeer` with its
settings in TEXTOPS_PEER_* variables (read when this module is imported, because
`@bentoml.service` takes them as it decorates the class). A request:

    POST /classify  {"texts": ["...", ...]}

is answered with a JSON list, one {"label": "...", "probabilities": [...]} per text, in
order. An image bundle is asked `POST /classify_images {"images": ["<base64 PNG or
JPEG>", ...]}` instead (BentoML derives an API's input schema from its method's
signature: one method per kind of item), answered the same way; each batch is decoded
with the bundle's `inputs.pixels`, then scored by `infer`. GET /readyz answers 200 once
the service is up.

How it is configured, and why:
- Adaptive batching on: `@bentoml.api(batchable=True)` (BentoML's default is off; docs:
  Get started > Adaptive batching). The dispatcher concatenates the `texts` lists of
  waiting requests along dimension 0 (`batch_dim` 0), calls `classify` once, and splits
  the returned list back by each request's length. `max_batch_size` counts items here
  (the dispatcher is batch-size aware and splits a request that would overflow a
  batch), and is set to 64, our service's value. `max_latency_ms` is not a wait but an
  upper bound on end to end latency past which the dispatcher answers 503; it is set to
  10 000 ms, our service's request timeout (its default is 60 000 ms), so it only
  refuses what our service would time out too.
- `workers` = cores: for CPU workloads the docs (Build with BentoML > Parallelize
  requests handling > CPU workloads) advise as many worker processes as cores, written
  `workers="cpu_count"`; the core count is passed explicitly so that the bench can run
  it on fewer cores than the machine has. Each worker is a whole server (HTTP, its
  own batch dispatcher, the model) and runs onnxruntime with cores // workers intra-op
  threads (so 1): workers x threads = cores.
- `traffic.timeout` 10 s, our service's request timeout; no `traffic.concurrency`
  (the docs tie it to autoscaling on BentoCloud; locally, no limit is the default).
- Access log off (per-request log lines, which our service does not write either).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import bentoml

from serving.bundle import Bundle, RuntimeOptions
from serving.engine.inference import infer

# Set by bench/peers/check.py only: one log line per model call, to see the batching.
LOG_BATCHES = os.environ.get("TEXTOPS_PEER_LOG_BATCHES") == "1"


def _env(name: str) -> str:
    return os.environ[f"TEXTOPS_PEER_{name}"]


@bentoml.service(
    workers=int(_env("WORKERS")),
    traffic={"timeout": float(_env("TIMEOUT_S"))},
    logging={"access": {"enabled": False}},
)
class TextClassifier:
    """One bundle per worker process; `classify` (texts) or `classify_images` (images)
    gets a whole adaptive batch."""

    def __init__(self) -> None:
        self.bundle = Bundle.load(Path(_env("BUNDLE")), "int8",
                                  RuntimeOptions(intra_op_threads=int(_env("THREADS"))))

    @bentoml.api(route="/classify", batchable=True, batch_dim=0,
                 max_batch_size=int(_env("MAX_BATCH")),
                 max_latency_ms=int(_env("MAX_LATENCY_MS")))
    def classify(self, texts: list[str]) -> list[dict]:
        self._takes("texts")
        return self._answers(texts)

    @bentoml.api(route="/classify_images", batchable=True, batch_dim=0,
                 max_batch_size=int(_env("MAX_BATCH")),
                 max_latency_ms=int(_env("MAX_LATENCY_MS")))
    def classify_images(self, images: list[str]) -> list[dict]:
        """`images`: PNG or JPEG files in base64."""
        self._takes("images")
        files = [base64.b64decode(image, validate=True) for image in images]
        return self._answers(list(self.bundle.inputs.pixels(files)))

    def _takes(self, kind: str) -> None:
        if self.bundle.task.items != kind:
            raise ValueError(f"this bundle takes {self.bundle.task.items}, not {kind}")

    def _answers(self, items: list) -> list[dict]:
        probs, _stats = infer(self.bundle, items)
        if LOG_BATCHES:
            print(f"textops-batch texts={len(items)}", flush=True)
        names = self.bundle.label_names
        return [{"label": names[i], "probabilities": row.tolist()}
                for i, row in zip(probs.argmax(axis=1), probs, strict=True)]
