"""The service's own routes: prediction, explanation, feedback, the label queue,
health, metadata, metrics, admin reload and the demo page. (The V2 protocol's routes are in
serving/api/v2.py.)"""

from __future__ import annotations

import asyncio
from importlib import resources

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

from serving.api.feedback import feedback_items, label_rule
from serving.api.hot_path import invalid, predict_answer
from serving.api.images import b64_file
from serving.api.schemas import (
    ExplainRequest,
    ExplainResponse,
    FeedbackItem,
    FeedbackResponse,
    ImageExplainRequest,
    ImageExplainResponse,
    NextWordPredictRequest,
    NextWordPredictResponse,
    PredictRequest,
    PredictResponse,
    ReloadRequest,
)
from serving.api.security import check_admin
from serving.api.v2_images import image_pixels
from serving.api.validation import check_texts
from serving.bundle import BundleError
from serving.engine.service import InferenceService
from serving.errors import ApiError
from serving.predlog.queue import label_queue

# A classifier's body, or a next-word model's (serving/api/next_word.py)
PREDICT_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"oneOf": [PredictRequest.model_json_schema(),
                         NextWordPredictRequest.model_json_schema()]}}}}}
_FEEDBACK_ITEM = FeedbackItem.model_json_schema()
# The body is one item or a list, parsed by `feedback_items` so that an error can name
# the item; OpenAPI still documents it.
FEEDBACK_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"oneOf": [_FEEDBACK_ITEM, {"type": "array", "items": _FEEDBACK_ITEM}]}}}}}


# /explain takes a text or an image, by the model served; the body is parsed by
# `explain_request` so that a field of the other kind is named.
EXPLAIN_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"oneOf": [ExplainRequest.model_json_schema(),
                         ImageExplainRequest.model_json_schema()]}}}}}
OTHER_KIND = {"text": "this model classifies images: send {\"image\": \"<base64>\"}",
              "image": "this model classifies texts: send {\"text\": \"...\"}"}


def explain_request(model: type[BaseModel], body: bytes, wrong: str) -> BaseModel:
    """An /explain body as `model`; 422 naming the field `wrong` (the other kind of
    model's) when it is there, else as FastAPI names a bad field (400 for bad JSON)."""
    if not body:
        raise ApiError(422, "invalid_request", "body: Field required", field="body")
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        if any(e["type"] == "extra_forbidden" and e["loc"] == (wrong,) for e in err.errors()):
            raise ApiError(422, "invalid_request", f"{wrong}: {OTHER_KIND[wrong]}",
                           field=wrong) from None
        raise invalid(err) from None


def router(service: InferenceService, require_key) -> APIRouter:
    """Routes over `service`; `require_key` guards the prediction routes."""
    settings = service.settings
    routes = APIRouter()

    @routes.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def demo() -> str:
        return resources.files("serving.api").joinpath("static/index.html").read_text("utf-8")

    @routes.post("/predict", response_model=PredictResponse | NextWordPredictResponse,
                 dependencies=[Depends(require_key)], openapi_extra=PREDICT_BODY)
    async def predict(http: Request) -> Response:
        """Classify up to `max_texts` texts (an image model: up to `max_images` images,
        base64 in `{"images": [...]}` or multipart file uploads): label, score and
        every class probability. A next-word model: each text's `k` most probable
        next words, with their probabilities.
        The answer's `request_id` (a well-formed client X-Request-ID, or a new one)
        names it in POST /feedback.

        The service answers this route in serving/api/hot_path.py, ahead of FastAPI's
        routing; this declaration documents it and shares its code."""
        answer, rid = await predict_answer(service, await http.body(),
                                           http.headers.get("x-request-id"),
                                           http.headers.get("content-type"), http.scope,
                                           http.headers.get("x-client-key"))
        return Response(answer, media_type="application/json", headers={"X-Request-ID": rid})

    @routes.post("/feedback", response_model=FeedbackResponse,
                 dependencies=[Depends(require_key)], openapi_extra=FEEDBACK_BODY)
    async def feedback(http: Request) -> FeedbackResponse:
        """The right label for answered texts: one `{request_id, label, position}` or a
        list of up to `max_texts`. All are stored or none; a repeated label replaces
        the earlier one. Live accuracy in /metrics rests on these. A next-word model's
        label is the word typed next (or the first word of a kept continuation)."""
        rule = label_rule(service.require_bundle())
        items = feedback_items(await http.body(), settings.max_texts, rule)
        return FeedbackResponse(accepted=await service.feedback(items))

    @routes.get("/label-queue")
    async def label_queue_route(
            budget: int = Query(20, ge=1, le=1000, description="how many answers"),
            strategy: str = Query("margin", pattern="^(margin|entropy)$"),
            scan: int = Query(10_000, ge=1, le=100_000,
                              description="among the newest unlabelled answers"),
            authorization: str | None = Header(None)) -> dict:
        """The logged answers most worth a label (active learning), excluding those
        already labelled: smallest margin between the top two probabilities first, or
        largest entropy; while a challenger runs in shadow mode, the answers it
        labelled otherwise come first (`disagreed`, its answer in `challenger`). Each
        item carries its request id and position for POST /feedback, and the logged
        text (normalised and masked, decrypted). It shows every user's texts, so it
        needs the admin token as `Authorization: Bearer <token>` (404 while the admin
        API is off)."""
        check_admin(settings.admin_token, authorization)
        if not settings.prediction_log:
            raise ApiError(404, "no_prediction_log", "the prediction log is off "
                           "(TEXTOPS_PREDICTION_LOG): there is nothing to label")
        # The running challenger's answers alone: a retired one's rows are stale. A
        # canary's answers are users' answers, in `predictions`; nothing pairs them.
        challenger = service.shadow.version if service.shadow else None
        items = await asyncio.to_thread(label_queue, settings.prediction_log,
                                        settings.log_cipher(), budget, strategy, scan,
                                        challenger)
        return {"strategy": strategy, "challenger": challenger, "items": items}

    @routes.post("/explain", response_model=ExplainResponse | ImageExplainResponse,
                 dependencies=[Depends(require_key)], openapi_extra=EXPLAIN_BODY)
    async def explain(http: Request) -> ExplainResponse | ImageExplainResponse:
        """Why the model gave its label, by occlusion. A text model (`{"text": ...}`):
        how much each token supports the label. An image model (`{"image": "<base64>"}`,
        optionally `cell_size`): per cell of a grid over the image, how much the
        label's probability drops when the cell is grayed out."""
        body = await http.body()
        bundle = service.bundle
        if bundle is not None and bundle.decoder is not None:
            raise ApiError(404, "not_a_classifier", "POST /explain explains a "
                           "classifier's label; this service serves a next-word model "
                           f"({bundle.version})", task=bundle.task.name)
        if bundle is not None and bundle.task.items == "images":
            request = explain_request(ImageExplainRequest, body, wrong="text")
            file = b64_file(request.image, "image")
            pixels = await image_pixels(bundle, [file], settings, lambda i: "image", "image")
            result, used = await service.explain(pixels[0], request.cell_size)
            return ImageExplainResponse(model_version=used.version, **result)
        request = explain_request(ExplainRequest, body, wrong="image")
        check_texts([request.text], settings.max_texts, settings.max_chars)
        result, bundle = await service.explain(request.text)
        return ExplainResponse(model_version=bundle.version, **result)

    @routes.get("/health/live")
    async def live() -> dict:
        """The process answers."""
        return {"status": "live"}

    @routes.get("/health/ready")
    async def ready():
        """200 once the model is loaded and warmed up in every server process, 503
        before (or if it failed)."""
        if service.bundle is None:
            status = "failed" if service.error else "loading"
            return JSONResponse({"status": status, "error": service.error}, status_code=503)
        starting, failures = service.workers_starting()
        if starting:
            return JSONResponse({"status": "failed" if failures else "starting",
                                 "error": "; ".join(failures) or None,
                                 "workers_starting": starting}, status_code=503)
        return {"status": "ready", "model_version": service.bundle.version}

    @routes.get("/metadata")
    async def metadata() -> dict:
        """The served bundle's bundle.json (version, labels, metrics, lineage) and, for a
        promoted bundle, its registry record (version, MLflow run, git commit), and what
        every server process serves (`workers`: they follow a new bundle one by one)."""
        bundle = service.require_bundle()
        beside = service.shadow or service.canary
        challenger = {"version": beside.version, "registry": beside.challenger.registry,
                      "mode": "shadow" if service.shadow else "canary"} if beside else (
            {"error": service.shadow_error} if service.shadow_error else None)
        return {**bundle.meta, "registry": bundle.registry, "precision": bundle.precision,
                "source": service.source.spec, "identity": service.identity,
                "challenger": challenger,
                "workers": await asyncio.to_thread(service.every_worker)}

    @routes.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @routes.post("/admin/reload")
    async def admin_reload(request: ReloadRequest | None = None,
                           authorization: str | None = Header(None)) -> dict:
        """Load a bundle (the followed one, or `bundle`) and swap it in, in every
        server process (`workers` says what each one serves once it has followed).
        Needs the admin token as `Authorization: Bearer <token>`."""
        check_admin(settings.admin_token, authorization)
        try:
            return await service.reload_everywhere(request.bundle if request else None)
        except BundleError as err:
            serving = getattr(service.bundle, "version", "nothing")
            raise ApiError(422, "bundle_refused", f"{err}; still serving {serving}") from None

    return routes
