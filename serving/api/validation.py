"""The input limits, checked before any text reaches the model.

One check for every prediction route (/predict, /explain and the V2 infer route), so
that `max_texts` and `max_chars` hold wherever a text comes in.
"""

from __future__ import annotations

from collections.abc import Callable

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
