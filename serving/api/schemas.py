"""The JSON bodies of /predict, /explain, /feedback and /admin/reload, as OpenAPI
documents them, and the request id that ties an answer to its feedback.

Request models refuse unknown fields, so a typo in a field name is a 422, not a
silently ignored field.
"""

from __future__ import annotations

import re
import secrets
import time

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(offered: str | None) -> str:
    """The client's id (X-Request-ID) when it is well-formed, else a new one: an id
    goes into logs and headers, so it must be short and plain."""
    if offered and REQUEST_ID_PATTERN.fullmatch(offered):
        return offered
    return new_request_id()


def issued_within(request_id: str, seconds: float) -> bool:
    """Whether `request_id` is one of ours (see new_request_id) issued less than
    `seconds` ago; a client's own id never is."""
    if len(request_id) != 32:
        return False
    try:
        issued = int(request_id[:14], 16) / 1e6
    except ValueError:
        return False
    return 0 <= time.time() - issued < seconds


def new_request_id() -> str:
    """32 hex digits: the time in microseconds, then 72 random bits. Ordered by time
    (as UUIDv7 is), so the prediction log's index on request ids grows at one end: with
    random ids, inserts landed on random pages and cost 4x more at 100k rows."""
    return f"{time.time_ns() // 1000:014x}{secrets.token_hex(9)}"


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
    request_id: str = Field(description="names this answer in POST /feedback; also the "
                            "X-Request-ID header")
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


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: StrictStr = Field(min_length=1, max_length=128,
                                  description="the answer's request_id")
    label: StrictStr = Field(description="the right label for the text")
    position: StrictInt = Field(0, ge=0, description="which text of the request (from 0)")


class FeedbackResponse(BaseModel):
    accepted: int = Field(description="labels stored; a repeated label replaces the earlier")
