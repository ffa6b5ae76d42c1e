"""The inference service: FastAPI on uvicorn, serving one model bundle.

Run it with `python -m serving` (settings from `TEXTOPS_*` environment variables) or
`uvicorn --factory serving.app:create_app`.

Routes: `POST /predict`, `GET /health/live`, `GET /health/ready`, `GET /metadata`,
OpenAPI docs at `/docs`.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from serving.bundle import Bundle, BundleError
from serving.settings import Settings

log = logging.getLogger("serving")

WARM_UP_TEXTS = ["warm up", "a somewhat longer sentence to warm up the model with " * 4]


class ApiError(Exception):
    """An error answered as `{"error": message, "code": ..., ...details}`."""

    def __init__(self, status: int, code: str, message: str, **details):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details

    def response(self, headers: dict | None = None) -> JSONResponse:
        body = {"error": self.message, "code": self.code, **self.details}
        return JSONResponse(body, status_code=self.status, headers=headers)


# ---------------------------------------------------------------- request / response


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] = Field(
        description="texts to classify", examples=[["a charming and often affecting journey"]]
    )


class Prediction(BaseModel):
    label: str
    score: float = Field(description="probability of the predicted label")
    probabilities: dict[str, float]


class PredictResponse(BaseModel):
    model_version: str
    predictions: list[Prediction]


def check_limits(texts: list[str], settings: Settings) -> None:
    """Refuse what the model should never see, naming the limit and the item."""
    if not texts:
        raise ApiError(422, "no_texts", "texts must hold at least one text")
    if len(texts) > settings.max_texts:
        raise ApiError(422, "too_many_texts",
                       f"{len(texts)} texts; at most {settings.max_texts} per request",
                       limit="max_texts", value=settings.max_texts)
    for i, text in enumerate(texts):
        if not text.strip():
            raise ApiError(422, "empty_text", f"texts[{i}] is empty", item=i)
        if len(text) > settings.max_chars:
            raise ApiError(422, "text_too_long",
                           f"texts[{i}] has {len(text)} characters; at most {settings.max_chars}",
                           limit="max_chars", value=settings.max_chars, item=i)


# ---------------------------------------------------------------- the model


class ModelState:
    """The bundle being served, and whether it is loaded and warmed up."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.bundle: Bundle | None = None
        self.error: str | None = None

    def load(self, path: str) -> Bundle:
        """Load and warm a bundle off the request path; BundleError if it is broken."""
        bundle = Bundle.load(path, self.settings.precision, self.settings.runtime_options())
        try:
            bundle.predict_proba(WARM_UP_TEXTS)
        except Exception as err:  # noqa: BLE001 - a bundle that cannot predict is broken
            raise BundleError(f"{path}: the model fails on warm-up texts ({err})") from err
        return bundle

    async def load_at_startup(self) -> None:
        try:
            self.bundle = await asyncio.to_thread(self.load, self.settings.bundle)
            log.info("serving bundle %s (%s)", self.bundle.version, self.settings.precision)
        except BundleError as err:
            self.error = str(err)
            log.error("cannot serve: %s", err)

    def ready_bundle(self) -> Bundle:
        if self.bundle is None:
            raise ApiError(503, "not_ready", self.error or "the model is still loading")
        return self.bundle


def predictions(bundle: Bundle, probs) -> list[Prediction]:
    names = bundle.label_names
    out = []
    for row in probs.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        out.append(Prediction(label=names[best], score=row[best],
                              probabilities=dict(zip(names, row, strict=True))))
    return out


# ---------------------------------------------------------------- the app


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over the limit, by header or as they stream.

    The body is read here (it is at most `max_bytes`) and replayed to the app, so a
    chunked upload without Content-Length is refused as soon as it crosses the limit.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = ApiError(413, "body_too_large", f"request body over {self.max_bytes} bytes",
                             limit="max_body_bytes", value=self.max_bytes).response()
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_large(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = ModelState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(state.load_at_startup())
        yield
        loading.cancel()

    app = FastAPI(
        title="textops text classifier",
        description="Classifies texts with the deployed model bundle.",
        lifespan=lifespan,
    )
    app.state.model = state
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        problems = err.errors()
        if any(p["type"] == "json_invalid" for p in problems):
            return ApiError(400, "invalid_json", "the request body is not valid JSON").response()
        first = problems[0]
        where = ".".join(str(part) for part in first["loc"][1:]) or "body"
        details = {"field": where}
        if len(first["loc"]) > 2 and isinstance(first["loc"][2], int):
            details["item"] = first["loc"][2]
        return ApiError(422, "invalid_request", f"{where}: {first['msg']}", **details).response()

    @app.post("/predict", response_model=PredictResponse)
    async def predict(request: PredictRequest) -> PredictResponse:
        """Classify up to `max_texts` texts: label, score and every class probability."""
        check_limits(request.texts, settings)
        bundle = state.ready_bundle()
        probs = await asyncio.to_thread(bundle.predict_proba, request.texts)
        return PredictResponse(model_version=bundle.version,
                               predictions=predictions(bundle, probs))

    @app.get("/health/live")
    async def live() -> dict:
        """The process answers."""
        return {"status": "live"}

    @app.get("/health/ready")
    async def ready():
        """200 once the model is loaded and warmed up, 503 before (or if it failed)."""
        if state.bundle is None:
            status = "failed" if state.error else "loading"
            return JSONResponse({"status": status, "error": state.error}, status_code=503)
        return {"status": "ready", "model_version": state.bundle.version}

    @app.get("/metadata")
    async def metadata() -> dict:
        """The served bundle's bundle.json: version, labels, metrics, lineage."""
        bundle = state.ready_bundle()
        return {**bundle.meta, "precision": bundle.precision, "bundle_path": str(bundle.path)}

    return app


def main() -> None:
    import uvicorn

    settings = Settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level="info", timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
