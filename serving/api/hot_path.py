"""`POST /predict` as a plain ASGI handler, ahead of FastAPI's routing.

With one text per request the model's share of a request is small, and what FastAPI
does around an endpoint (routing, dependency resolution, reading the body through
`Request`, exception middleware, the body-limit replay) cost more per request than
this handler's whole work (py-spy: bench/profile_serving.py). So `PredictHotPath` sits
outermost in the app and answers `POST /predict` itself:

- the same checks with the same answers as FastAPI gave: API key (401, checked
  first, before the body is read), body size (413), JSON (400; an empty body is 422
  `body: Field required`) and schema (422) through pydantic's `PredictRequest`, the
  input limits (`check_texts`), queue and timeout (503/504). The body is read as JSON
  whatever its Content-Type says;
- the same metrics (`textops_requests_total`, `textops_request_seconds`) and the same
  prediction log entry;
- everything else goes on to FastAPI, which also still documents `/predict` in
  OpenAPI through the route in serving/api/routes.py (`predict_answer` is shared, so the
  two cannot answer differently).
"""

from __future__ import annotations

import logging
import time

import orjson
from pydantic import ValidationError

from serving.api import images
from serving.api.next_word import predict_next_words
from serving.api.schemas import PredictRequest
from serving.api.security import bearer, secret_matches
from serving.api.validation import check_texts, invalid
from serving.bundle import Bundle
from serving.bundle.predictions import predictions
from serving.engine.service import InferenceService
from serving.errors import ApiError
from serving.request_ids import request_id

log = logging.getLogger("serving")
ROUTE = "/predict"
JSON = (b"content-type", b"application/json")


async def predict_answer(service: InferenceService, body: bytes, offered_id: str | None,
                         content_type: str | None = None, scope: dict | None = None,
                         client_key: str | None = None) -> tuple[bytes, str]:
    """The JSON answer to a /predict body and its request id; ApiError if refused. An
    image bundle takes images (serving/api/images.py), any other texts; a next-word
    bundle answers their next words (serving/api/next_word.py). `client_key`
    (X-Client-Key) keeps a client with one model while a canary runs."""
    settings = service.settings
    bundle = service.bundle
    if bundle is not None and bundle.task.items == "images":
        return await predict_images(service, bundle, body, offered_id, content_type, scope,
                                    client_key)
    if bundle is not None and bundle.decoder is not None:  # a next-word model
        return await predict_next_words(service, bundle, body, offered_id, client_key)
    if not body:
        raise ApiError(422, "invalid_request", "body: Field required", field="body")
    try:
        request = PredictRequest.model_validate_json(body)
    except ValidationError as err:
        raise invalid(err) from None
    check_texts(request.texts, settings.max_texts, settings.max_chars)
    rid = request_id(offered_id)
    probs, bundle, encoded = await service.predict(request.texts, client_key or rid)
    service.log_prediction(rid, bundle, request.texts, probs)
    service.shadow_score(rid, request.texts, probs, bundle, encoded)
    answer = {"request_id": rid, "model_version": bundle.version, **service.role(bundle),
              "predictions": predictions(bundle.label_names, probs)}
    return orjson.dumps(answer), rid


async def predict_images(service: InferenceService, bundle: Bundle, body: bytes,
                         offered_id: str | None, content_type: str | None,
                         scope: dict | None, client_key: str | None = None
                         ) -> tuple[bytes, str]:
    settings = service.settings
    if content_type and content_type.startswith(images.MULTIPART) and scope is not None:
        files = await images.from_multipart(scope, body, settings.max_images)
    elif not body:
        raise ApiError(422, "invalid_request", "body: Field required", field="body")
    else:
        files = images.from_json(body, invalid)
    images.check(files, settings)
    pixels = await images.decode(bundle, files)
    rid = request_id(offered_id)
    probs, used, _ = await service.predict(list(pixels), client_key or rid)
    logged = await images.log_keys(images.file_keys(files), pixels,
                                   settings.prediction_log_images)
    service.log_prediction(rid, used, logged, probs)
    service.shadow_score(rid, list(pixels), probs, used)
    answer = {"request_id": rid, "model_version": used.version, **service.role(used),
              "predictions": predictions(used.label_names, probs)}
    return orjson.dumps(answer), rid


class ClientGone(Exception):
    """The client disconnected before its body arrived."""


class PredictHotPath:
    """Answers POST /predict; passes everything else to `app`."""

    def __init__(self, app, service: InferenceService):
        self.app, self.service = app, service
        self.keys = service.settings.api_key_list()
        self.max_bytes = service.settings.max_body_bytes
        metrics = service.metrics
        # label lookups done once: each costs a dict lookup and a lock per request
        self.latency = metrics.latency.labels(ROUTE)
        self.counted = {status: metrics.requests.labels(ROUTE, "POST", str(status))
                        for status in (200, 400, 401, 413, 422, 500, 503, 504)}
        self.requests = metrics.requests

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != ROUTE or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = dict(scope["headers"])
        try:
            self.authorize(headers)
            body = await self.read_body(headers, receive)
            answer, rid = await predict_answer(self.service, body,
                                               _text(headers.get(b"x-request-id")),
                                               _text(headers.get(b"content-type")), scope,
                                               _text(headers.get(b"x-client-key")))
        except ClientGone:
            status = 499  # nginx's "client closed request": nobody to answer
        except ApiError as err:
            status = err.status
            await err.response()(scope, receive, send)
        except Exception:  # noqa: BLE001 - answered 500, as FastAPI would
            log.exception("POST /predict failed")
            status = 500
            await ApiError(500, "internal_error", "the service failed to answer this "
                           "request").response()(scope, receive, send)
        else:
            status = 200
            await send({"type": "http.response.start", "status": 200, "headers": [
                JSON, (b"content-length", str(len(answer)).encode()),
                (b"x-request-id", rid.encode())]})
            await send({"type": "http.response.body", "body": answer})
        counter = self.counted.get(status) or self.requests.labels(ROUTE, "POST", str(status))
        counter.inc()
        self.latency.observe(time.perf_counter() - started)

    def authorize(self, headers: dict[bytes, bytes]) -> None:
        if not self.keys:
            return
        offered = _text(headers.get(b"x-api-key")) or bearer(
            _text(headers.get(b"authorization")))
        if not secret_matches(offered, self.keys):
            raise ApiError(401, "unauthorized", "a valid API key is required "
                           "(Authorization: Bearer <key>, or X-API-Key)")

    async def read_body(self, headers: dict[bytes, bytes], receive) -> bytes:
        """The whole body, refused (413) past the limit by header or as it streams."""
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            raise self.too_large()
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise self.too_large()
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def too_large(self) -> ApiError:
        return ApiError(413, "body_too_large", f"request body over {self.max_bytes} bytes",
                        limit="max_body_bytes", value=self.max_bytes)


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None
