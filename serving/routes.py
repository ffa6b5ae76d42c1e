"""The service's own routes: prediction, explanation, health, metadata, metrics,
admin reload and the demo page. (The V2 protocol's routes are in serving/v2.py.)"""

from __future__ import annotations

from importlib import resources

import orjson
from fastapi import APIRouter, Depends, Header
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.bundle import BundleError
from serving.errors import ApiError
from serving.predictions import predictions
from serving.schemas import (
    ExplainRequest,
    ExplainResponse,
    PredictRequest,
    PredictResponse,
    ReloadRequest,
)
from serving.security import check_admin
from serving.service import InferenceService
from serving.validation import check_texts


def router(service: InferenceService, require_key) -> APIRouter:
    """Routes over `service`; `require_key` guards the prediction routes."""
    settings = service.settings
    routes = APIRouter()

    @routes.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def demo() -> str:
        return resources.files("serving").joinpath("static/index.html").read_text("utf-8")

    @routes.post("/predict", response_model=PredictResponse,
                 dependencies=[Depends(require_key)])
    async def predict(request: PredictRequest) -> Response:
        """Classify up to `max_texts` texts: label, score and every class probability."""
        check_texts(request.texts, settings.max_texts, settings.max_chars)
        probs, bundle = await service.predict(request.texts)
        # Serialised directly (orjson): the hot path skips re-validating its own output.
        body = {"model_version": bundle.version,
                "predictions": predictions(bundle.label_names, probs)}
        return Response(orjson.dumps(body), media_type="application/json")

    @routes.post("/explain", response_model=ExplainResponse,
                 dependencies=[Depends(require_key)])
    async def explain_text(request: ExplainRequest) -> ExplainResponse:
        """Per-token attributions by occlusion: how much each token supports the label."""
        check_texts([request.text], settings.max_texts, settings.max_chars)
        result, bundle = await service.explain(request.text)
        return ExplainResponse(model_version=bundle.version, **result)

    @routes.get("/health/live")
    async def live() -> dict:
        """The process answers."""
        return {"status": "live"}

    @routes.get("/health/ready")
    async def ready():
        """200 once the model is loaded and warmed up, 503 before (or if it failed)."""
        if service.bundle is None:
            status = "failed" if service.error else "loading"
            return JSONResponse({"status": status, "error": service.error}, status_code=503)
        return {"status": "ready", "model_version": service.bundle.version}

    @routes.get("/metadata")
    async def metadata() -> dict:
        """The served bundle's bundle.json (version, labels, metrics, lineage) and, for a
        promoted bundle, its registry record (version, MLflow run, git commit)."""
        bundle = service.require_bundle()
        return {**bundle.meta, "registry": bundle.registry, "precision": bundle.precision,
                "source": service.source.spec, "identity": service.identity}

    @routes.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    @routes.post("/admin/reload")
    async def admin_reload(request: ReloadRequest | None = None,
                           authorization: str | None = Header(None)) -> dict:
        """Load a bundle (the followed one, or `bundle`) and swap it in. Needs the
        admin token as `Authorization: Bearer <token>`."""
        check_admin(settings.admin_token, authorization)
        try:
            return await service.reload(request.bundle if request else None)
        except BundleError as err:
            serving = getattr(service.bundle, "version", "nothing")
            raise ApiError(422, "bundle_refused", f"{err}; still serving {serving}") from None

    return routes
