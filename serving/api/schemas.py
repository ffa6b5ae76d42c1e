"""The JSON bodies of /predict, /explain, /feedback and /admin/reload, as OpenAPI
documents them (the request id that ties an answer to its feedback:
serving/request_ids.py).

Request models refuse unknown fields, so a typo in a field name is a 422, not a
silently ignored field.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] = Field(
        description="texts to classify", examples=[["a charming and often affecting journey"]]
    )


class ImagePredictRequest(BaseModel):
    """An image model's /predict body (multipart file uploads are the other way)."""

    model_config = ConfigDict(extra="forbid")
    images: list[StrictStr] = Field(description="images to classify: PNG, JPEG or any "
                                    "format Pillow reads, base64-encoded")


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
