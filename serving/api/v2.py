"""The Open Inference Protocol (KServe V2) REST API, beside `/predict`.

A text model takes a BYTES input `text`; an image model `image`, BYTES, a base64 file
per element, or `pixels`, UINT8 [N, height, width, channels 1|3|4] of any size, which
the bundle's image spec converts as it does a file. Both answer `probabilities` (FP32,
[n, classes]) and `label` (BYTES, [n]) as /predict does. A next-word model takes
`text` and an optional request parameter `k`, and answers `next_words` (BYTES) and
`probabilities` (FP32), both [n, k] (serving/api/v2_next_word.py). Errors are
`{"error": ...}` naming the element (serving/api/errors.py); the limits are /predict's,
and each `pixels` image also keeps within `max_image_bytes` and `max_pixels`.

An answer's request id (for POST /feedback and the prediction log) is the request's
`id` when it is well-formed, else a well-formed X-Request-ID header, else a new one; it
comes back as the `X-Request-ID` header and in `parameters.request_id`, while `id` is
echoed as the protocol requires (and holds the request id when the client sent none).
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from serving.api.v2_images import IMAGE_INPUTS, image_inputs
from serving.api.v2_next_word import infer_next_words, next_word_metadata
from serving.api.v2_tensors import (
    InferRequest,
    counted,
    flatten,
    parse_request,
    the_input,
    wanted_outputs,
)
from serving.api.validation import check_texts
from serving.bundle import Bundle
from serving.bundle.predictions import predictions
from serving.engine.service import InferenceService
from serving.errors import ApiError
from serving.request_ids import REQUEST_ID_PATTERN, request_id
from serving.settings import Settings

OUTPUTS = ("probabilities", "label")


def answer_id(body_id: str | None, header_id: str | None) -> str:
    """The request id of an inference: the protocol's own `id` when it is
    well-formed, else the header's (or a new one)."""
    if body_id is not None and REQUEST_ID_PATTERN.fullmatch(body_id):
        return body_id
    return request_id(header_id)


def model_metadata(bundle: Bundle, settings: Settings) -> dict:
    common = {"name": bundle.meta["model_name"], "versions": [bundle.version],
              "platform": "onnxruntime_onnx"}
    if bundle.decoder is not None:
        return common | next_word_metadata(settings)
    inputs = [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    parameters = {"label_names": bundle.label_names}
    if bundle.task.items == "images":  # one of the two inputs, as `inputs_one_of` says
        spec = bundle.inputs.spec
        inputs = [{"name": name, "datatype": kind, "shape": [-1] * (1 if kind == "BYTES" else 4)}
                  for name, kind in IMAGE_INPUTS.items()]
        parameters |= {"inputs_one_of": list(IMAGE_INPUTS), "image_size": {
            "height": spec.height, "width": spec.width, "channels": spec.channels,
            "resize": spec.resize}}
    outputs = [{"name": "probabilities", "datatype": "FP32",
                "shape": [-1, len(bundle.label_names)]},
               {"name": "label", "datatype": "BYTES", "shape": [-1]}]
    return common | {"inputs": inputs, "outputs": outputs, "parameters": parameters}


def output_tensors(probs, bundle: Bundle) -> dict[str, dict]:
    labels = [p["label"] for p in predictions(bundle.label_names, probs)]
    return {
        "probabilities": {"name": "probabilities", "datatype": "FP32",
                          "shape": list(probs.shape), "data": probs.ravel().tolist()},
        "label": {"name": "label", "datatype": "BYTES", "shape": [len(labels)],
                  "data": labels},
    }


def v2_router(service: InferenceService, require_key) -> APIRouter:
    """Routes over `service`; `require_key` guards inference."""
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (V2)"])
    settings = service.settings

    def bundle_named(name: str) -> Bundle:
        bundle = service.require_bundle()
        if name != bundle.meta["model_name"]:
            raise ApiError(404, "unknown_model",
                           f"unknown model {name!r} (serving {bundle.meta['model_name']!r})")
        return bundle

    async def classify(served: Bundle, request: InferRequest, rid: str
                       ) -> tuple[list[dict], Bundle]:
        if served.task.items == "images":
            items, keys = await image_inputs(request, served, settings)
        else:
            tensor = the_input(request, {"text": "BYTES"})
            items = keys = counted(tensor, flatten(tensor.data))
            check_texts(items, settings.max_texts, settings.max_chars,
                        name="input 'text' element {}".format)
        wanted = wanted_outputs(request, OUTPUTS)
        probs, bundle, encoded = await service.predict(items, rid)
        service.log_prediction(rid, bundle, keys, probs)
        service.shadow_score(rid, items, probs, bundle, encoded)
        tensors = output_tensors(probs, bundle)
        return [tensors[o] for o in wanted], bundle

    @router.get("")
    async def server_metadata() -> dict:
        return {"name": "textops", "version": "1", "extensions": []}

    @router.get("/health/live")
    async def live() -> dict:
        return {"live": True}

    @router.get("/health/ready")
    async def ready():
        ok = service.bundle is not None and not service.workers_starting()[0]
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @router.get("/models/{name}")
    @router.get("/models/{name}/versions/{version}")
    async def metadata(name: str, version: str | None = None) -> dict:
        return model_metadata(bundle_named(name), settings)

    @router.get("/models/{name}/ready")
    @router.get("/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None):
        bundle_named(name)
        return {"name": name, "ready": True}

    # The body is parsed here rather than by FastAPI: V2 clients (tritonclient among
    # them) send JSON without a Content-Type header.
    body_schema = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": InferRequest.model_json_schema()}}}}

    @router.post("/models/{name}/infer", dependencies=[Depends(require_key)],
                 openapi_extra=body_schema)
    @router.post("/models/{name}/versions/{version}/infer", dependencies=[Depends(require_key)],
                 openapi_extra=body_schema)
    async def infer(name: str, raw: Request, version: str | None = None) -> Response:
        served = bundle_named(name)
        request = parse_request(await raw.body())
        rid = answer_id(request.id, raw.headers.get("x-request-id"))
        if served.decoder is not None:
            outputs, bundle = await infer_next_words(service, served, request, rid)
        else:
            outputs, bundle = await classify(served, request, rid)
        response = {"model_name": name, "model_version": bundle.version,
                    "id": rid if request.id is None else request.id,
                    "parameters": {"request_id": rid},
                    "outputs": outputs}
        return Response(orjson.dumps(response), media_type="application/json",
                        headers={"X-Request-ID": rid})

    return router
