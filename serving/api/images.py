"""Images for `POST /predict`: base64 in JSON or multipart file uploads, checked and
decoded before any of them reaches the model.

- `{"images": ["<base64 PNG or JPEG>", ...]}` (a `data:image/...;base64,` prefix, as a
  browser's FileReader gives, is accepted), or `multipart/form-data` with the files
  under any field name, in order.
- Limits: `max_images` per request, `max_image_bytes` per encoded file (413), the body
  size as for text (413), and the bundle's `max_pixels` per decoded image (413: a
  decompression bomb is refused from its header). A file that is not an image or is
  truncated is a 422. Every refusal names the item (`images[i]`).
- Decoding is per request, so a bad image fails its own request only; small images
  decode on the event loop, larger ones on a worker thread (`INLINE_BYTES`,
  `INLINE_PIXELS`).
- The prediction log keeps each image's sha256 and, when
  `TEXTOPS_PREDICTION_LOG_IMAGES=thumbnail`, the image as the model saw it: the
  bundle's size and channels, as a PNG `data:` URI (`log_keys`), which collect reads
  back as feedback (pipeline/tasks/image_classification/feedback.py). Never the
  uploaded file itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib

import numpy as np
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from serving.api.schemas import ImagePredictRequest
from serving.bundle import Bundle
from serving.bundle.images import ImageError, thumbnail
from serving.errors import ApiError
from serving.settings import Settings

MULTIPART = "multipart/form-data"
# What a request may decode on the event loop: up to 16 KiB of files (reading a
# header walks the file's chunks: its cost grows with the bytes) holding up to 65,536
# pixels (64 thumbnails of 32x32, a 256x256 photo), well under a millisecond. Handing
# small images to a thread and back cost more CPU than decoding them
# (bench/profile_serving.py; the throughput is on docs/results/serving_images.md);
# anything larger decodes on a thread, where Pillow decodes without the GIL and the
# loop answers meanwhile.
INLINE_BYTES = 16_384
INLINE_PIXELS = 65_536


def from_json(body: bytes, invalid) -> list[bytes]:
    """The encoded files of a JSON body; `invalid` turns a ValidationError into the
    route's 400/422."""
    try:
        request = ImagePredictRequest.model_validate_json(body)
    except ValidationError as err:
        raise invalid(err) from None
    return [b64_file(text, f"images[{i}]", item=i) for i, text in enumerate(request.images)]


def b64_file(text, name: str, **details) -> bytes:
    """The file in a base64 string (a browser's `data:` prefix allowed); 422 naming it
    else. `details` go into the error (the item's index)."""
    if not isinstance(text, str):
        raise ApiError(422, "invalid_request", f"{name} is not a string (base64 of a file)",
                       **details)
    try:
        return base64.b64decode(text.split(",", 1)[-1] if text.startswith("data:") else text,
                                validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_base64", f"{name} is not valid base64",
                       **details) from None


async def from_multipart(scope: dict, body: bytes, max_images: int) -> list[bytes]:
    """The uploaded files of a multipart body, in order."""
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    request = Request(scope, replay)
    try:
        async with request.form(max_files=max_images + 1, max_fields=max_images + 1) as form:
            return [await value.read() for _, value in form.multi_items()
                    if isinstance(value, UploadFile)]
    except Exception as err:  # starlette: MultiPartException, or a malformed body
        raise ApiError(400, "invalid_multipart", f"the multipart body cannot be read "
                       f"({err})") from None


def check(images: list[bytes], settings: Settings) -> None:
    if not images:
        raise ApiError(422, "no_images", "images must hold at least one image")
    if len(images) > settings.max_images:
        raise ApiError(422, "too_many_images", f"{len(images)} images; at most "
                       f"{settings.max_images} per request", limit="max_images",
                       value=settings.max_images)
    for i, data in enumerate(images):
        if not data:
            raise ApiError(422, "empty_image", f"images[{i}] is empty", item=i)
        if len(data) > settings.max_image_bytes:
            raise ApiError(413, "image_too_large", f"images[{i}] has {len(data)} bytes; at "
                           f"most {settings.max_image_bytes}", limit="max_image_bytes",
                           value=settings.max_image_bytes, item=i)


def pixel_count(image) -> int:
    """An opened file's pixels, or an array's ([height, width] or [height, width, c])."""
    if isinstance(image, Image.Image):
        return image.width * image.height
    shape = np.shape(image)
    return int(np.prod(shape[:2])) if len(shape) >= 2 else int(np.size(image))


async def decode(bundle: Bundle, images: list) -> np.ndarray:
    """uint8 [n, height, width, channels] by the bundle's spec; 413 for an image over
    the pixel limit, 422 for one that cannot be decoded, naming it. A small request
    decodes at once (`INLINE_BYTES`, `INLINE_PIXELS`), a larger one on a worker thread."""
    opened = []
    try:
        files = sum(len(item) for item in images if isinstance(item, bytes | bytearray))
        if files > INLINE_BYTES:
            return await asyncio.to_thread(bundle.inputs.pixels, images)
        # files opened (headers only); arrays, from V2's UINT8 tensors, as they are
        opened = [bundle.inputs.spec.open(item, f"images[{i}]")
                  if isinstance(item, bytes | bytearray) else item
                  for i, item in enumerate(images)]
        if sum(map(pixel_count, opened)) <= INLINE_PIXELS:
            return bundle.inputs.pixels(opened)
        return await asyncio.to_thread(bundle.inputs.pixels, opened)
    except ImageError as err:
        for image in opened:  # those not decoded yet
            if isinstance(image, Image.Image):
                image.close()
        index = int(err.item.removeprefix("images[").removesuffix("]"))
        status, code = ((413, "image_too_large") if "pixels, over the limit" in err.reason
                        or "decompression bomb" in err.reason else (422, "invalid_image"))
        raise ApiError(status, code, str(err), item=index) from None


def file_keys(images: list[bytes]) -> list[str]:
    """Each encoded file's sha256, as the prediction log names it."""
    return [f"sha256:{hashlib.sha256(data).hexdigest()}" for data in images]


async def log_keys(keys: list[str], pixels, policy: str) -> list[str]:
    """What the prediction log stores for each image: its key (a sha256) under the
    `hash` policy; under `thumbnail` the decoded pixels (uint8 [h, w, c] each, as the
    model took them) as a PNG data URI, with the key in its fragment so that the row
    still names what was sent. PNG encoding runs on a worker thread."""
    if policy != "thumbnail":
        return keys
    uris = await asyncio.to_thread(lambda: [thumbnail(image) for image in pixels])
    return [f"{uri}#{key}" for uri, key in zip(uris, keys, strict=True)]

