"""`POST /feedback` bodies: one `{request_id, label, position}` or a list of them,
checked item by item so that an error names the item and what is wrong with it.

What a label is depends on the model served (`label_rule`):
- a classifier's: one of the bundle's label names, as sent;
- a next-word model's: the word typed next after the text (or the first word of a
  continuation that was kept). It is normalised by the bundle's own tokenizer
  (lower-cased where training was) and cut at the tokenizer's first word boundary, so
  "The," labels an answer as "the" would: live accuracy compares it with the word
  the model put first.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
from pydantic import ValidationError

from serving.api.schemas import FeedbackItem
from serving.bundle import Bundle
from serving.errors import ApiError

# A label's check: the label to store, or BadLabel saying what is wrong with it.
LabelRule = Callable[[str], str]


class BadLabel(ValueError):
    """What is wrong with a label; `details` go into the error answer."""

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.details = details


def label_rule(bundle: Bundle) -> LabelRule:
    """How `bundle`'s answers are labelled."""
    if bundle.decoder is not None:
        return next_word_rule(bundle)
    names = bundle.label_names

    def one_of_the_labels(label: str) -> str:
        if label not in names:
            raise BadLabel(f"{label!r} is not a label of the model (labels: "
                           f"{', '.join(names)})", labels=names)
        return label
    return one_of_the_labels


def next_word_rule(bundle: Bundle) -> LabelRule:
    tokenizer = bundle.tokenizer

    def the_word_typed_next(label: str) -> str:
        text = tokenizer.normalizer.normalize_str(label) if tokenizer.normalizer else label
        pieces = tokenizer.pre_tokenizer.pre_tokenize_str(text) if text.strip() else []
        if not pieces:
            raise BadLabel("empty: send the word typed next")
        # by offsets into the normalised text: a byte-level piece carries a marker
        start, end = pieces[0][1]
        word = text[start:end].strip()
        if len(text.split()) > 1:
            raise BadLabel(f"{label!r} is more than one word: send the word typed next")
        return word
    return the_word_typed_next


def feedback_items(body: bytes, max_items: int, rule: LabelRule
                   ) -> list[tuple[str, int, str]]:
    """(request_id, position, label) of each item of a /feedback body, its label as
    `rule` stores it; a 4xx naming the first bad item and what is wrong with it."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None
    if not isinstance(payload, dict | list):
        raise ApiError(422, "invalid_request",
                       "the body must be a feedback object or a list of them")
    items = payload if isinstance(payload, list) else [payload]
    if not items:
        raise ApiError(422, "no_feedback", "send at least one feedback item")
    if len(items) > max_items:
        raise ApiError(422, "too_many_items", f"{len(items)} feedback items; at most "
                       f"{max_items} per request", limit="max_texts", value=max_items)
    return [feedback_item(item, i if isinstance(payload, list) else None, rule)
            for i, item in enumerate(items)]


def feedback_item(item, index: int | None, rule: LabelRule) -> tuple[str, int, str]:
    where = "body" if index is None else f"[{index}]"
    details = {} if index is None else {"item": index}
    try:
        parsed = FeedbackItem.model_validate(item)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        field = ".".join(str(part) for part in first["loc"]) or "item"
        raise ApiError(422, "invalid_request", f"{where}.{field}: {first['msg']}",
                       field=field, **details) from None
    try:
        label = rule(parsed.label)
    except BadLabel as err:
        raise ApiError(422, "unknown_label", f"{where}.label: {err}", field="label",
                       **err.details, **details) from None
    return parsed.request_id, parsed.position, label
