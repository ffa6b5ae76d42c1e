"""A next-word model's answers: /predict's top-k next words and POST /generate.

- `POST /predict` with `{"texts": [...], "k": 5}`: each text's k most probable next
  words with their probabilities. Answered on the hot path (serving/api/hot_path.py)
  through `predict_next_words` (and on V2 infer, serving/api/v2_next_word.py, through
  `top_next_words`), and computed by the batcher (serving/engine/batcher.py)
  as one prefill per length group: a top-k is one model call over the prompt and
  nothing after it, which is what the batcher already does for classification, with
  its queue bound, timeout, length grouping and batch metrics; concurrent /predict
  requests share calls there. The decoding steps (below) are for what takes many.
- `POST /generate`: a continuation of a prompt, greedy or sampled, decoded in the
  generator's continuous batching (serving/engine/generation.py); the JSON answer
  when the sequence ends, or with `"stream": true` server-sent events: one per token,
  `data: {"token": ..., "text": <the continuation so far>}`, then a last one holding
  the whole answer as the JSON route gives it (`finish_reason` among it). A failure
  after the stream has started (the request timeout, a shutdown) ends it with
  `event: error` and `{"error", "code"}`; before the first token it is an HTTP error
  as on any route.

Limits (422 naming the field): `k` up to TEXTOPS_MAX_NEXT_WORDS, `max_new_tokens` up
to TEXTOPS_MAX_NEW_TOKENS, a text or prompt up to TEXTOPS_MAX_CHARS characters and
the model's context in tokens.

The prediction log keeps each /predict text with its top words, and each finished
/generate prompt with its continuation (serving/predlog/rows.py); the word the model
put first after the prompt (for /generate too, whatever a sample then took) is what
`POST /feedback`'s label, the word typed next, is compared with for live top-1
accuracy.

Beside a challenger (serving/engine/challenger.py): in shadow mode every logged
/predict and V2 answer, and every logged /generate prompt with the word the champion
put first, is offered to it (it logs its own top words: serving/engine/shadow.py);
in canary mode /predict and V2 are answered by the challenger for the clients it takes
(`X-Client-Key`, else the request id), with `"role"` in the /predict answer, while
/generate is always the champion's (serving/engine/canary.py says why).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from serving.api.schemas import (
    DEFAULT_NEW_TOKENS,
    GenerateRequest,
    GenerateResponse,
    NextWordPredictRequest,
)
from serving.api.validation import check_texts, invalid
from serving.bundle import Bundle
from serving.bundle.sampling import Sampling
from serving.engine.generation import Closed, Generation, Update
from serving.engine.service import InferenceService
from serving.errors import ApiError
from serving.predlog.rows import next_word_answers
from serving.request_ids import request_id
from serving.settings import Settings

log = logging.getLogger("serving")
GENERATE_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": GenerateRequest.model_json_schema()}}}}
SSE_EVENTS = {200: {"description": "with `stream`: server-sent events, one per token "
                    "(`{\"token\", \"text\"}`), then the whole answer",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def check_context(bundle: Bundle, prompts: list[str], name: Callable[[int], str]) -> list:
    """Each prompt's word ids; 422 naming the first that does not fit the model's
    context (it follows an [EOS], as documents did in training)."""
    encoded = bundle.decoder.inputs.encode(prompts)
    room = bundle.decoder.max_len
    for i, ids in enumerate(encoded):
        if room is not None and len(ids) + 1 > room:
            field = name(i)
            raise ApiError(422, "prompt_too_long", f"{field} has {len(ids)} tokens; the "
                           f"model's context holds {room - 1}", field=field.split("[")[0],
                           limit="max_len", value=room - 1,
                           **({"item": i} if "[" in field else {}))
    return encoded


def parse(model: type[BaseModel], body: bytes) -> BaseModel:
    """A JSON body (whatever its Content-Type says, as /predict reads it) as `model`;
    400 for bad JSON, 422 naming the field."""
    if not body:
        raise ApiError(422, "invalid_request", "body: Field required", field="body")
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        raise invalid(err) from None


def bounded_k(k: int | None, settings: Settings) -> int:
    """`k` next words per text, else TEXTOPS_NEXT_WORDS; 422 naming `k` over
    TEXTOPS_MAX_NEXT_WORDS."""
    k = k or settings.next_words
    if k > settings.max_next_words:
        raise ApiError(422, "invalid_request", f"k: at most {settings.max_next_words} "
                       f"next words per text, not {k}", field="k",
                       limit="max_next_words", value=settings.max_next_words)
    return k


async def top_next_words(service: InferenceService, bundle: Bundle, texts: list, k: int,
                         name: Callable[[int], str] = "texts[{}]".format,
                         key: str | None = None
                         ) -> tuple[list[list[tuple[str, float]]], Bundle]:
    """Each text's k most probable next words (word, probability), computed by the
    batcher, and the bundle that computed them (in canary mode the challenger's for
    the `key`s it takes); 422 (400 on V2 routes) naming (`name(i)`) a text over the
    limits or the served model's context (a challenger's shorter context keeps the
    latest tokens: serving/engine/inference.py `infer_next_words`)."""
    settings = service.settings
    check_texts(texts, settings.max_texts, settings.max_chars, name)
    check_context(bundle, texts, name)
    rows, used, _ = await service.predict(texts, key)
    return [row[:k] for row in rows], used


async def predict_next_words(service: InferenceService, bundle: Bundle, body: bytes,
                             offered_id: str | None, client_key: str | None = None
                             ) -> tuple[bytes, str]:
    """The JSON answer to a next-word /predict body and its request id."""
    request = parse(NextWordPredictRequest, body)
    k = bounded_k(request.k, service.settings)
    rid = request_id(offered_id)
    rows, used = await top_next_words(service, bundle, request.texts, k,
                                      key=client_key or rid)
    log_next_words(service, rid, used, request.texts, rows, k)
    answer = {"request_id": rid, "model_version": used.version, **service.role(used),
              "predictions": [
                  {"next_words": [{"word": word, "probability": p} for word, p in row]}
                  for row in rows]}
    return orjson.dumps(answer), rid


def log_next_words(service: InferenceService, rid: str, bundle: Bundle, texts: list[str],
                   rows: list[list[tuple[str, float]]], k: int) -> None:
    """Answered texts into the prediction log, each under its top word, and offered
    to a challenger in shadow mode (which logs its own `k` top words beside them)."""
    answers = next_word_answers(rows)
    service.log_prediction(rid, bundle, texts, answers)
    service.shadow_next_words(rid, texts, [label for label, _ in answers], k)


def sampling(request: GenerateRequest, bundle: Bundle, limit: int) -> Sampling:
    """How the request decodes: what it says, else the bundle's `generation` defaults
    (bundle.json, from the task's configuration), else the schema's; 422 naming
    `max_new_tokens` over `limit`."""
    defaults = bundle.meta.get("generation") or {}
    chosen = {name: getattr(request, name) if name in request.model_fields_set
              else defaults.get(name, getattr(request, name))
              for name in ("temperature", "top_k", "top_p")}
    new_tokens = request.max_new_tokens or min(
        defaults.get("max_new_tokens", DEFAULT_NEW_TOKENS), limit)
    if new_tokens > limit:
        raise ApiError(422, "invalid_request", f"max_new_tokens: at most {limit}, not "
                       f"{new_tokens}", field="max_new_tokens", limit="max_new_tokens",
                       value=limit)
    if request.min_new_tokens > new_tokens:
        raise ApiError(422, "invalid_request", f"min_new_tokens: at most max_new_tokens "
                       f"({new_tokens}), not {request.min_new_tokens}",
                       field="min_new_tokens")
    return Sampling(**chosen, seed=request.seed, max_new_tokens=new_tokens,
                    min_new_tokens=request.min_new_tokens, stop=tuple(request.stop))


def answer(service: InferenceService, generation: Generation, rid: str,
           prompt_tokens: int) -> dict:
    seq = generation.seq
    return {"text": seq.text, "tokens": generation.decoder.inputs.words(seq.generated),
            "finish_reason": seq.finish_reason, "request_id": rid,
            "model_version": generation.bundle.version, **service.role(generation.bundle),
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(seq.generated)}}


def log_generation(service: InferenceService, generation: Generation, rid: str,
                   prompt: str) -> None:
    """A finished continuation into the prediction log, under the word the model put
    first after the prompt (a sample may have taken another), as /predict's answer
    would be logged, and that word offered to a challenger in shadow mode, which logs
    its own top word beside it (not a continuation: the first word is what a label
    is compared with). An empty prompt is not logged: no text to learn from."""
    seq = generation.seq
    if not prompt.strip() or seq.first_top is None:
        return
    (first,) = generation.decoder.inputs.words([seq.first_top])
    service.log_prediction(rid, generation.bundle, [prompt], [
        (first, {"completion": seq.text, "finish_reason": seq.finish_reason})])
    service.shadow_next_words(rid, [prompt], [first], 1)


def failure(service: InferenceService, err: Exception) -> ApiError:
    """What a generation that did not finish is answered."""
    if isinstance(err, TimeoutError):
        return service.timed_out()
    if isinstance(err, Closed):
        return ApiError(503, "shutting_down", str(err), headers={"Retry-After": "1"})
    log.error("a generation failed: %r", err)
    return ApiError(500, "internal_error", "the model failed on this request")


def event(data: dict, name: str | None = None) -> bytes:
    return (f"event: {name}\n".encode() if name else b"") + b"data: " + orjson.dumps(data) \
        + b"\n\n"


async def events(service: InferenceService, generation: Generation, first: Update,
                 updates: AsyncIterator[Update], rid: str, prompt: str, prompt_tokens: int
                 ) -> AsyncIterator[bytes]:
    """The stream of a generation whose first update has come."""
    try:
        update = first
        while True:
            if update.token is not None:
                yield event({"token": update.token, "text": update.text})
            if update.finish_reason is not None:
                log_generation(service, generation, rid, prompt)
                yield event(answer(service, generation, rid, prompt_tokens))
                return
            try:
                update = await anext(updates)
            except Exception as err:  # noqa: BLE001 - told to the client, in the stream
                error = failure(service, err)
                yield event({"error": error.message, "code": error.code}, "error")
                return
    finally:  # the client left (the response was cancelled), or it ended
        generation.cancel()


def generate_router(service: InferenceService, require_key) -> APIRouter:
    """POST /generate over `service`; `require_key` guards it."""
    settings = service.settings
    routes = APIRouter()

    @routes.post("/generate", response_model=GenerateResponse, responses=SSE_EVENTS,
                 dependencies=[Depends(require_key)], openapi_extra=GENERATE_BODY)
    async def generate(http: Request) -> Response:
        """Continue `prompt` with a next-word model: greedy (`temperature` 0) or
        sampled (`temperature`, `top_k`, `top_p`; a `seed` repeats a sample), up to
        `max_new_tokens`, ending early at [EOS] or a `stop` text. Requests in flight
        share every decoding step (continuous batching). With `stream`, server-sent
        events: one per token, then the whole answer."""
        bundle = service.require_next_word("/generate")
        request = parse(GenerateRequest, await http.body())
        if len(request.prompt) > settings.max_chars:
            raise ApiError(422, "text_too_long", f"prompt has {len(request.prompt)} "
                           f"characters; at most {settings.max_chars}", field="prompt",
                           limit="max_chars", value=settings.max_chars)
        chosen = sampling(request, bundle, settings.max_new_tokens)
        (prompt,) = check_context(bundle, [request.prompt], lambda i: "prompt")
        rid = request_id(http.headers.get("x-request-id"))
        deadline = asyncio.get_running_loop().time() + settings.request_timeout_s
        generation = service.generate(bundle, prompt, chosen)
        headers = {"X-Request-ID": rid}
        if not request.stream:
            try:
                await generation.result(deadline)
            except Exception as err:  # noqa: BLE001 - answered as failure() says
                raise failure(service, err) from None
            log_generation(service, generation, rid, request.prompt)
            return JSONResponse(answer(service, generation, rid, len(prompt)),
                                headers=headers)
        updates = generation.stream(deadline)
        try:  # errors before the first token are still HTTP errors
            first = await anext(updates)
        except Exception as err:  # noqa: BLE001
            raise failure(service, err) from None
        return StreamingResponse(events(service, generation, first, updates, rid,
                                        request.prompt, len(prompt)),
                                 media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    return routes
