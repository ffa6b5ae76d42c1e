"""Errors as clients read them, on every route.

Routes raise `ApiError`; it is answered as `{"error": message, "code": ..., ...details}`,
or as `{"error": message}` on the Open Inference Protocol routes under `/v2/`, which
answer bad requests 400 where the others answer 422 (as the protocol says).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from serving.errors import ApiError

V2_PREFIX = "/v2/"


def from_validation(err: RequestValidationError) -> ApiError:
    """FastAPI's body validation errors as one ApiError naming the first bad field."""
    problems = err.errors()
    if any(p["type"] == "json_invalid" for p in problems):
        return ApiError(400, "invalid_json", "the request body is not valid JSON")
    first = problems[0]
    where = ".".join(str(part) for part in first["loc"][1:]) or "body"
    details = {"field": where}
    if len(first["loc"]) > 2 and isinstance(first["loc"][2], int):
        details["item"] = first["loc"][2]
    return ApiError(422, "invalid_request", f"{where}: {first['msg']}", **details)


def add_error_handlers(app: FastAPI) -> None:
    def answer(request: Request, error: ApiError) -> JSONResponse:
        return error.response(v2=request.url.path.startswith(V2_PREFIX))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return answer(request, err)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        return answer(request, from_validation(err))
