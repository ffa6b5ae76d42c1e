"""The JSON bodies of /predict, /explain (a text model's and an image model's),
/feedback and /admin/reload, as OpenAPI documents them (the request id that ties an
answer to its feedback: serving/request_ids.py).

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


class ImageExplainRequest(BaseModel):
    """An image model's /explain body."""

    model_config = ConfigDict(extra="forbid")
    image: StrictStr = Field(description="the image: PNG, JPEG or any format Pillow reads, "
                             "base64-encoded")
    cell_size: StrictInt | None = Field(None, ge=1, description="side of an occluded cell "
                                        "in the model's input pixels (default: a grid of "
                                        "about 7x7 cells)")


class Saliency(BaseModel):
    rows: int
    cols: int
    cell_height: int = Field(description="in the model's input pixels (the last row and "
                             "column may be cut short by the image's edge)")
    cell_width: int
    values: list[list[float]] = Field(description="per cell, row by row: the drop in the "
                                      "label's probability when the cell is grayed out")


class ImageExplainResponse(BaseModel):
    model_version: str
    label: str
    score: float
    probabilities: dict[str, float]
    saliency: Saliency


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
