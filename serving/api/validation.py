"""The input limits, checked before any text reaches the model, and how a body that
is not what a route takes is answered.

One check for every prediction route (/predict, /explain, /generate and the V2 infer
route), so that `max_texts` and `max_chars` hold wherever a text comes in.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError

from serving.errors import ApiError


def check_texts(texts: list, max_texts: int, max_chars: int,
                name: Callable[[int], str] = "texts[{}]".format) -> None:
    """Refuse what the model should never see, naming the limit and the item.

    `name(i)` is how the route calls item i in its messages (the V2 route has no
    `texts` field).
    """
    if not texts:
        raise ApiError(422, "no_texts", "texts must hold at least one text")
    if len(texts) > max_texts:
        raise ApiError(422, "too_many_texts", f"{len(texts)} texts; at most {max_texts} "
                       "per request", limit="max_texts", value=max_texts)
    for i, text in enumerate(texts):
        # /predict's schema has refused non-strings already; V2 tensors may hold anything
        if not isinstance(text, str):
            raise ApiError(422, "invalid_request", f"{name(i)} is not a string", item=i)
        if not text.strip():
            raise ApiError(422, "empty_text", f"{name(i)} is empty", item=i)
        if len(text) > max_chars:
            raise ApiError(422, "text_too_long",
                           f"{name(i)} has {len(text)} characters; at most {max_chars}",
                           limit="max_chars", value=max_chars, item=i)


def invalid(err: ValidationError) -> ApiError:
    """A body that is not the route's request model, answered as FastAPI's validation errors
    are everywhere else (serving/api/errors.py): 400 for bad JSON, 422 naming the field."""
    first = err.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return ApiError(400, "invalid_json", "the request body is not valid JSON")
    where = ".".join(str(part) for part in first["loc"]) or "body"
    details = {"field": where}
    if len(first["loc"]) > 1 and isinstance(first["loc"][1], int):
        details["item"] = first["loc"][1]
    return ApiError(422, "invalid_request", f"{where}: {first['msg']}", **details)
