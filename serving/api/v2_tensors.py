"""The Open Inference Protocol's request body: its tensors, parsed and checked, with
errors in the protocol's terms (400, naming the input). Shared by the text, image and
next-word halves of the V2 route (serving/api/v2.py, v2_images.py, v2_next_word.py)."""

from __future__ import annotations

from math import prod
from typing import Any

from pydantic import BaseModel, ValidationError

from serving.errors import ApiError


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


def the_input(request: InferRequest, kinds: dict[str, str]) -> InferInput:
    """The request's one input, with a name and datatype of `kinds` (name: datatype)."""
    if len(request.inputs) != 1 or request.inputs[0].name not in kinds:
        raise bad_request("expected exactly one input, named "
                          + " or ".join(repr(name) for name in kinds))
    tensor = request.inputs[0]
    if tensor.datatype != kinds[tensor.name]:
        raise bad_request(f"input {tensor.name!r} must be {kinds[tensor.name]}, "
                          f"not {tensor.datatype}")
    return tensor


def counted(tensor: InferInput, elements: list) -> list:
    """`elements`, when as many as the tensor's shape says."""
    if prod(tensor.shape) != len(elements):
        raise bad_request(f"input {tensor.name!r} has shape {tensor.shape} but "
                          f"{len(elements)} elements")
    return elements


def wanted_outputs(request: InferRequest, known: tuple[str, ...]) -> list[str]:
    """The outputs the request asks for (all of `known` when it names none)."""
    wanted = [o.name for o in request.outputs] if request.outputs else list(known)
    unknown = [o for o in wanted if o not in known]
    if unknown:
        raise bad_request(f"unknown output {unknown[0]!r} (outputs: {', '.join(known)})")
    return wanted
