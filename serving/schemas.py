"""The JSON bodies of /predict, /explain and /admin/reload, as OpenAPI documents them.

Request models refuse unknown fields, so a typo in a field name is a 422, not a
silently ignored field.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictStr


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
