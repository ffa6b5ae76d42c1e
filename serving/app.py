"""The inference service: FastAPI on uvicorn, serving one model bundle.

Run it with `python -m serving` (settings from `TEXTOPS_*` environment variables, see
serving/settings.py) or `uvicorn --factory serving.app:create_app`.

Routes
- `POST /predict`, `POST /explain`, and the Open Inference Protocol under `/v2`;
- `GET /health/live`, `GET /health/ready` (503 until a bundle is loaded and warm),
  `GET /metadata`, `GET /metrics` (Prometheus), OpenAPI docs at `/docs`;
- `POST /admin/reload` (needs `TEXTOPS_ADMIN_TOKEN`);
- `GET /`: a demo page.

Requests are micro-batched (serving/batcher.py). A new bundle (the `current` link or
the registry alias moved, or an admin reload) is loaded and warmed off the request
path and swapped in with one assignment; requests in flight finish on the old one.
A bundle that fails to load is refused and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sys
import time
from contextlib import asynccontextmanager
from importlib import resources

import numpy as np
import orjson
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from serving.batcher import Batcher, QueueFull
from serving.bundle import Bundle, BundleError
from serving.explain import explain
from serving.metrics import ServiceMetrics
from serving.settings import Settings
from serving.source import BundleSource
from serving.v2 import V2Error, v2_router

log = logging.getLogger("serving")

WARM_UP_TEXTS = ["warm up", "a somewhat longer sentence to warm up the model with " * 4]


class ApiError(Exception):
    """An error answered as `{"error": message, "code": ..., ...details}`."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None,
                 **details):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers, self.details = headers, details

    def response(self) -> JSONResponse:
        body = {"error": self.message, "code": self.code, **self.details}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


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


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: StrictStr = Field(examples=["a charming and often affecting journey"])


class TokenAttribution(BaseModel):
    token: str
    start: int = Field(description="character offset of the token in the text")
    end: int
    attribution: float = Field(description="drop in the label's probability without it")


class ExplainResponse(BaseModel):
    model_version: str
    label: str
    score: float
    probabilities: dict[str, float]
    tokens: list[TokenAttribution]


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bundle: str | None = Field(None, description="a new bundle path or models:/ URI to follow")


def check_texts(texts: list[str], settings: Settings) -> None:
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


def predictions(names: list[str], probs: np.ndarray) -> list[dict]:
    """One {label, score, probabilities} per row, as PredictResponse documents it."""
    out = []
    for row in probs.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        out.append({"label": names[best], "score": row[best],
                    "probabilities": dict(zip(names, row, strict=True))})
    return out


# ---------------------------------------------------------------- the service


class ModelState:
    """The bundle being served, where it came from, and the last load error."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.bundle: Bundle | None = None
        self.identity: str | None = None
        self.error: str | None = None

    def load(self, path) -> Bundle:
        """Load and warm a bundle; BundleError if it cannot serve."""
        bundle = Bundle.load(path, self.settings.precision, self.settings.runtime_options())
        try:
            bundle.predict_proba(WARM_UP_TEXTS)
        except Exception as err:  # noqa: BLE001 - a bundle that cannot predict is broken
            raise BundleError(f"{path}: the model fails on warm-up texts ({err})") from err
        return bundle


class Service:
    """Everything the routes share: settings, the model, the batcher, the metrics."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = ServiceMetrics(settings.drift_window)
        self.state = ModelState(settings)
        self.source = BundleSource(settings.bundle, settings.cache_dir)
        self.batcher: Batcher | None = None
        self.reload_lock = asyncio.Lock()
        self.refused_identity: str | None = None
        self.watcher: asyncio.Task | None = None

    async def start(self) -> None:
        s = self.settings
        self.batcher = Batcher(lambda: self.state.bundle, s.max_batch_size, s.max_wait_ms,
                               s.max_queue, on_batch=self.metrics.observe_batch,
                               enabled=s.batching, workers=s.inference_threads)
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth)
        try:
            await self.reload()
        except BundleError as err:
            self.state.error = str(err)
            log.error("cannot serve yet: %s", err)
        if s.watch_interval_s > 0:
            self.watcher = asyncio.create_task(self.watch())

    async def stop(self) -> None:
        if self.watcher:
            self.watcher.cancel()
        if self.batcher:
            await asyncio.to_thread(self.batcher.close)

    async def predict(self, texts: list[str]) -> tuple[np.ndarray, Bundle]:
        """Probabilities and the bundle that computed them."""
        if self.state.bundle is None:
            raise ApiError(503, "not_ready", self.state.error or "the model is still loading")
        try:
            return await asyncio.wait_for(self.batcher.submit(texts),
                                          self.settings.request_timeout_s)
        except QueueFull as err:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(503, "overloaded", f"the service is at capacity: {err}",
                           headers={"Retry-After": "1"}) from None
        except TimeoutError:
            self.metrics.rejected.labels("timeout").inc()
            raise ApiError(504, "timeout", "no answer within "
                           f"{self.settings.request_timeout_s} s") from None

    async def reload(self, spec: str | None = None) -> dict:
        """Load, warm and swap in the bundle behind `spec` (default: the followed one)."""
        async with self.reload_lock:
            source = BundleSource(spec, self.settings.cache_dir) if spec else self.source
            try:
                identity = await asyncio.to_thread(source.identity)
                path = await asyncio.to_thread(source.fetch, identity)
                bundle = await asyncio.to_thread(self.state.load, path)
            except BundleError:
                self.metrics.reloads.labels("refused").inc()
                raise
            except Exception as err:  # registry or file system: the bundle is not there
                self.metrics.reloads.labels("refused").inc()
                raise BundleError(f"{source.spec}: cannot fetch the bundle ({err})") from err
            previous = self.state.bundle
            self.state.bundle, self.state.identity, self.state.error = bundle, identity, None
            self.source = source  # follow what was loaded from now on
            self.metrics.set_model(bundle.meta, bundle.precision)
            self.metrics.reloads.labels("ok").inc()
            log.info("serving bundle %s from %s", bundle.version, path)
            return {"model_version": bundle.version,
                    "previous_version": previous.version if previous else None}

    async def watch(self) -> None:
        """Follow the bundle spec: reload when the link or the registry alias moves."""
        while True:
            await asyncio.sleep(self.settings.watch_interval_s)
            try:
                identity = await asyncio.to_thread(self.source.identity)
            except Exception as err:  # noqa: BLE001 - e.g. the tracking server is down
                log.warning("cannot check %s: %s", self.source.spec, err)
                continue
            if identity in (self.state.identity, self.refused_identity):
                continue
            try:
                await self.reload()
            except BundleError as err:
                self.refused_identity = identity
                log.error("refused %s, still serving the old bundle: %s", identity, err)


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
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self.too_large()(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self.too_large()(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    def too_large(self) -> JSONResponse:
        # Built only when needed: rendering it took ~17 µs of every request's event-loop time.
        return ApiError(413, "body_too_large", f"request body over {self.max_bytes} bytes",
                        limit="max_body_bytes", value=self.max_bytes).response()


class RequestMetrics:
    """ASGI middleware: count and time every request by route template and status.
    (Plain ASGI: FastAPI's `@app.middleware("http")` costs far more per request.)"""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(path, scope["method"], str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)


def secret_matches(offered: str | None, secrets: list[str]) -> bool:
    """Constant-time comparison, so response timing does not leak the secret."""
    if not offered:
        return False
    return any(hmac.compare_digest(offered.encode(), s.encode()) for s in secrets)


def bearer(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()  # uvicorn has finished the requests in flight by now

    # FastAPI's own OpenTelemetry instrumentation costs a span per request; the
    # service reports through Prometheus instead.
    app = FastAPI(title="textops text classifier",
                  description="Classifies texts with the deployed model bundle.",
                  lifespan=lifespan,
                  telemetry={"tracing": False, "metrics": False, "logs": False,
                             "operation_spans": False})
    app.state.service = service
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=service.metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return err.response()

    @app.exception_handler(V2Error)
    async def v2_error(request: Request, err: V2Error):
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        problems = err.errors()
        if any(p["type"] == "json_invalid" for p in problems):
            error = ApiError(400, "invalid_json", "the request body is not valid JSON")
        else:
            first = problems[0]
            where = ".".join(str(part) for part in first["loc"][1:]) or "body"
            details = {"field": where}
            if len(first["loc"]) > 2 and isinstance(first["loc"][2], int):
                details["item"] = first["loc"][2]
            error = ApiError(422, "invalid_request", f"{where}: {first['msg']}", **details)
        if request.url.path.startswith("/v2/"):
            return JSONResponse({"error": error.message}, status_code=400)
        return error.response()

    keys = settings.api_key_list()

    async def check_key(authorization: str | None = Header(None),
                        x_api_key: str | None = Header(None)) -> None:
        if not secret_matches(x_api_key or bearer(authorization), keys):
            raise ApiError(401, "unauthorized", "a valid API key is required "
                           "(Authorization: Bearer <key>, or X-API-Key)")

    async def no_key() -> None:
        """API keys are off: nothing to check, and no header parsing per request."""

    require_key = check_key if keys else no_key

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def demo() -> str:
        return resources.files("serving").joinpath("static/index.html").read_text("utf-8")

    @app.post("/predict", response_model=PredictResponse, dependencies=[Depends(require_key)])
    async def predict(request: PredictRequest) -> Response:
        """Classify up to `max_texts` texts: label, score and every class probability."""
        check_texts(request.texts, settings)
        probs, bundle = await service.predict(request.texts)
        # Serialised directly (orjson): the hot path skips re-validating its own output.
        body = {"model_version": bundle.version,
                "predictions": predictions(bundle.label_names, probs)}
        return Response(orjson.dumps(body), media_type="application/json")

    @app.post("/explain", response_model=ExplainResponse, dependencies=[Depends(require_key)])
    async def explain_text(request: ExplainRequest) -> ExplainResponse:
        """Per-token attributions by occlusion: how much each token supports the label."""
        check_texts([request.text], settings)
        bundle = service.state.bundle
        if bundle is None:
            raise ApiError(503, "not_ready", service.state.error or "the model is loading")
        result = await asyncio.to_thread(explain, bundle, request.text)
        return ExplainResponse(model_version=bundle.version, **result)

    @app.get("/health/live")
    async def live() -> dict:
        """The process answers."""
        return {"status": "live"}

    @app.get("/health/ready")
    async def ready():
        """200 once the model is loaded and warmed up, 503 before (or if it failed)."""
        if service.state.bundle is None:
            status = "failed" if service.state.error else "loading"
            return JSONResponse({"status": status, "error": service.state.error},
                                status_code=503)
        return {"status": "ready", "model_version": service.state.bundle.version}

    @app.get("/metadata")
    async def metadata() -> dict:
        """The served bundle's bundle.json: version, labels, metrics, lineage."""
        bundle = service.state.bundle
        if bundle is None:
            raise ApiError(503, "not_ready", service.state.error or "the model is loading")
        return {**bundle.meta, "precision": bundle.precision, "source": service.source.spec,
                "identity": service.state.identity}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload")
    async def admin_reload(request: ReloadRequest | None = None,
                           authorization: str | None = Header(None)) -> dict:
        """Load a bundle (the followed one, or `bundle`) and swap it in. Needs the
        admin token as `Authorization: Bearer <token>`."""
        if not settings.admin_token:
            raise ApiError(404, "disabled", "the admin API is off (set TEXTOPS_ADMIN_TOKEN)")
        if not secret_matches(bearer(authorization), [settings.admin_token]):
            raise ApiError(401, "unauthorized", "a valid admin token is required")
        try:
            return await service.reload(request.bundle if request else None)
        except BundleError as err:
            raise ApiError(422, "bundle_refused", f"{err}; still serving "
                           f"{getattr(service.state.bundle, 'version', 'nothing')}") from None

    app.include_router(v2_router(service, require_key))
    return app


def main() -> None:
    import uvicorn

    settings = Settings()
    sys.setswitchinterval(settings.switch_interval_ms / 1000)  # process-wide: set here only
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level="info", access_log=False,
                timeout_graceful_shutdown=int(settings.request_timeout_s * 3))


if __name__ == "__main__":
    main()
