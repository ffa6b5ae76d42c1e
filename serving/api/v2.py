"""The Open Inference Protocol (KServe V2) REST API, beside `/predict`.

The model takes a BYTES input `text` (one text per element) and returns
`probabilities` (FP32, [n, classes]) and `label` (BYTES, [n]). Errors are
`{"error": message}`, as the protocol says (serving/api/errors.py renders them so). The
input limits are /predict's (serving/api/validation.py).

An answer's request id (for POST /feedback and the prediction log) is the request's
`id` when it is well-formed, else a well-formed X-Request-ID header, else a new one; it
comes back as the `X-Request-ID` header and in `parameters.request_id`, while `id` is
echoed as the protocol requires (and holds the request id when the client sent none).
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from serving.api.validation import check_texts
from serving.bundle import Bundle
from serving.bundle.predictions import predictions
from serving.engine.service import InferenceService
from serving.errors import ApiError
from serving.request_ids import REQUEST_ID_PATTERN, request_id

OUTPUTS = ("probabilities", "label")


def bad_request(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


class InferInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None


def parse_request(body: bytes) -> InferRequest:
    try:
        return InferRequest.model_validate_json(body)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            raise bad_request("the request body is not valid JSON") from None
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise bad_request(f"{where}: {first['msg']}") from None


def flatten(data: list) -> list:
    """V2 tensors may be sent flat or nested in row-major order."""
    flat = []
    for item in data:
        flat.extend(flatten(item) if isinstance(item, list) else [item])
    return flat


def texts_from(request: InferRequest) -> list:
    """The elements of the one BYTES input `text`, unchecked."""
    if len(request.inputs) != 1 or request.inputs[0].name != "text":
        raise bad_request("expected exactly one input, named 'text'")
    tensor = request.inputs[0]
    if tensor.datatype != "BYTES":
        raise bad_request(f"input 'text' must be BYTES, not {tensor.datatype}")
    texts = flatten(tensor.data)
    count = 1
    for dim in tensor.shape:
        count *= dim
    if count != len(texts):
        raise bad_request(f"input 'text' has shape {tensor.shape} but {len(texts)} elements")
    return texts


def wanted_outputs(request: InferRequest) -> list[str]:
    wanted = [o.name for o in request.outputs] if request.outputs else list(OUTPUTS)
    unknown = [o for o in wanted if o not in OUTPUTS]
    if unknown:
        raise bad_request(f"unknown output {unknown[0]!r} (outputs: {', '.join(OUTPUTS)})")
    return wanted


def answer_id(body_id: str | None, header_id: str | None) -> str:
    """The request id of an inference: the protocol's own `id` when it is
    well-formed, else the header's (or a new one)."""
    if body_id is not None and REQUEST_ID_PATTERN.fullmatch(body_id):
        return body_id
    return request_id(header_id)


def model_metadata(bundle: Bundle) -> dict:
    return {
        "name": bundle.meta["model_name"],
        "versions": [bundle.version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32",
             "shape": [-1, len(bundle.label_names)]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {"label_names": bundle.label_names},
    }


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

    @router.get("")
    async def server_metadata() -> dict:
        return {"name": "textops", "version": "1", "extensions": []}

    @router.get("/health/live")
    async def live() -> dict:
        return {"live": True}

    @router.get("/health/ready")
    async def ready():
        ok = service.bundle is not None
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @router.get("/models/{name}")
    @router.get("/models/{name}/versions/{version}")
    async def metadata(name: str, version: str | None = None) -> dict:
        return model_metadata(bundle_named(name))

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
        bundle_named(name)
        request = parse_request(await raw.body())
        texts = texts_from(request)
        check_texts(texts, settings.max_texts, settings.max_chars,
                    name="input 'text' element {}".format)
        wanted = wanted_outputs(request)
        rid = answer_id(request.id, raw.headers.get("x-request-id"))
        probs, bundle = await service.predict(texts)
        service.log_prediction(rid, bundle, texts, probs)
        tensors = output_tensors(probs, bundle)
        response = {"model_name": name, "model_version": bundle.version,
                    "id": rid if request.id is None else request.id,
                    "parameters": {"request_id": rid},
                    "outputs": [tensors[o] for o in wanted]}
        return Response(orjson.dumps(response), media_type="application/json",
                        headers={"X-Request-ID": rid})

    return router
