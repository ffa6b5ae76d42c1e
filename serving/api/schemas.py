"""The JSON bodies of /predict, /explain (a text model's and an image model's),
/generate and a next-word model's /predict, /feedback and /admin/reload, as OpenAPI
documents them (the request id that ties an answer to its feedback:
serving/request_ids.py).

Request models refuse unknown fields, so a typo in a field name is a 422, not a
silently ignored field.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
)


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


# Only while a canary runs (serving/engine/canary.py): which model answered.
ROLE = Field(None, description="while a canary runs: champion or challenger, the model "
             "that gave this answer (model_version names it)")


class PredictResponse(BaseModel):
    request_id: str = Field(description="names this answer in POST /feedback; also the "
                            "X-Request-ID header")
    model_version: str
    role: Literal["champion", "challenger"] | None = ROLE
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
    label: StrictStr = Field(max_length=200,
                             description="the right label for the text; for a next-word "
                             "model, the word typed next")
    position: StrictInt = Field(0, ge=0, description="which text of the request (from 0)")


class FeedbackResponse(BaseModel):
    accepted: int = Field(description="labels stored; a repeated label replaces the earlier")


# ---------------------------------------------------------------- a next-word model


class NextWordPredictRequest(BaseModel):
    """A next-word model's /predict body."""

    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] = Field(description="texts whose next word is wanted",
                                   examples=[["the cat sat on the"]])
    k: StrictInt | None = Field(None, ge=1, description="next words per text (default "
                                "TEXTOPS_NEXT_WORDS, at most TEXTOPS_MAX_NEXT_WORDS)")


class NextWord(BaseModel):
    word: str
    probability: float = Field(description="under the model's whole distribution")


class NextWordPrediction(BaseModel):
    next_words: list[NextWord] = Field(description="the k most probable, best first")


class NextWordPredictResponse(BaseModel):
    request_id: str = Field(description="also the X-Request-ID header")
    model_version: str
    role: Literal["champion", "challenger"] | None = ROLE
    predictions: list[NextWordPrediction]


StopText = Annotated[StrictStr, StringConstraints(min_length=1, max_length=200)]
DEFAULT_NEW_TOKENS = 32


class GenerateRequest(BaseModel):
    """POST /generate: continue a prompt, greedily (temperature 0) or by sampling."""

    model_config = ConfigDict(extra="forbid")
    prompt: StrictStr = Field(description="the text to continue (empty: a new document)",
                              examples=["the cat sat"])
    # Left out, these four take the bundle's `generation` defaults (bundle.json), else
    # the ones below.
    max_new_tokens: StrictInt | None = Field(
        None, ge=1, description=f"tokens to generate at most (default: the bundle's, "
        f"else {DEFAULT_NEW_TOKENS}; never over TEXTOPS_MAX_NEW_TOKENS)")
    min_new_tokens: StrictInt = Field(0, ge=0, description="tokens to generate before "
                                      "the end of a document may end the continuation "
                                      "(a stop text or the model's context still may)")
    temperature: StrictFloat = Field(0.0, ge=0, allow_inf_nan=False,
                                     description="0: greedy; above: sample")
    top_k: StrictInt = Field(0, ge=0, description="sample among the k most probable "
                             "tokens (0: all)")
    top_p: StrictFloat = Field(1.0, gt=0, le=1, allow_inf_nan=False,
                               description="sample among the most probable tokens "
                               "holding this much probability (1: all)")
    seed: StrictInt | None = Field(None, ge=0, lt=2**64, description="the same seed, "
                                   "prompt and settings give the same sample")
    stop: list[StopText] = Field([], max_length=8, description="texts that end the "
                                 "continuation where they first appear (not returned)")
    stream: StrictBool = Field(False, description="answer as server-sent events, one per "
                               "token, then one with the finish reason")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    text: str = Field(description="the continuation, cut before a stop text")
    tokens: list[str] = Field(description="the tokens generated, in order")
    finish_reason: Literal["eos", "stop", "length"] = Field(
        description="eos: the model ended the document; stop: a stop text appeared; "
        "length: max_new_tokens, or the model's context, reached")
    request_id: str
    model_version: str
    role: Literal["champion"] | None = Field(None, description="while a canary runs: "
                                             "/generate is always the champion's")
    usage: Usage
