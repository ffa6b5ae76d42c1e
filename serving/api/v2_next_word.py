"""The V2 route for a next-word bundle: the BYTES input `text` and an optional request
parameter `k` (next words per text: TEXTOPS_NEXT_WORDS when left out, at most
TEXTOPS_MAX_NEXT_WORDS) answer `next_words` (BYTES, [n, k]) and `probabilities`
(FP32, [n, k]), each row most probable first: /predict's top-k, through the same
checks and the batcher (serving/api/next_word.py `top_next_words`), and beside a
challenger as /predict is: offered to it in shadow mode, answered by it in canary mode
for the request ids it takes (V2 has no client key) under its `model_version`."""

from __future__ import annotations

from serving.api.next_word import bounded_k, log_next_words, top_next_words
from serving.api.v2_tensors import (
    InferRequest,
    bad_request,
    counted,
    flatten,
    the_input,
    wanted_outputs,
)
from serving.bundle import Bundle
from serving.engine.service import InferenceService
from serving.settings import Settings

OUTPUTS = ("next_words", "probabilities")


def next_word_metadata(settings: Settings) -> dict:
    """The inputs, outputs and parameters `GET /v2/models/{name}` lists."""
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "next_words", "datatype": "BYTES", "shape": [-1, -1]},
                        {"name": "probabilities", "datatype": "FP32", "shape": [-1, -1]}],
            "parameters": {"k": settings.next_words, "max_k": settings.max_next_words}}


def requested_k(request: InferRequest, settings: Settings) -> int:
    k = (request.parameters or {}).get("k")
    if k is not None and (type(k) is not int or k < 1):
        raise bad_request(f"parameter 'k' must be a positive integer, not {k!r}")
    return bounded_k(k, settings)


async def infer_next_words(service: InferenceService, bundle: Bundle, request: InferRequest,
                           rid: str) -> tuple[list[dict], Bundle]:
    """The output tensors the request asks for, and the bundle that computed them; the
    answers logged under `rid` as /predict's are."""
    k = requested_k(request, service.settings)
    tensor = the_input(request, {"text": "BYTES"})
    texts = counted(tensor, flatten(tensor.data))
    wanted = wanted_outputs(request, OUTPUTS)
    rows, used = await top_next_words(service, bundle, texts, k,
                                      "input 'text' element {}".format, key=rid)
    log_next_words(service, rid, used, texts, rows, k)
    shape = [len(rows), len(rows[0]) if rows else k]
    tensors = {
        "next_words": {"name": "next_words", "datatype": "BYTES", "shape": shape,
                       "data": [word for row in rows for word, _ in row]},
        "probabilities": {"name": "probabilities", "datatype": "FP32", "shape": shape,
                          "data": [p for row in rows for _, p in row]},
    }
    return [tensors[o] for o in wanted], used
