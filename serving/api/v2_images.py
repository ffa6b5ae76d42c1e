"""The V2 route's image inputs: `image`, BYTES, a base64 file per element, or
`pixels`, UINT8 [N, height, width, channels 1|3|4] of any size, which the bundle's
image spec converts as it does a file. The limits are /predict's
(serving/api/images.py); each `pixels` image also keeps within `max_image_bytes` and
`max_pixels`, checked from the shape before the data is read."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from math import prod

import numpy as np

from serving.api import images
from serving.api.images import b64_file
from serving.api.v2_tensors import (
    InferInput,
    InferRequest,
    bad_request,
    counted,
    flatten,
    the_input,
)
from serving.bundle import Bundle
from serving.errors import ApiError
from serving.settings import Settings

IMAGE_INPUTS = {"image": "BYTES", "pixels": "UINT8"}  # an image model takes one of them


async def image_pixels(bundle: Bundle, items: list, settings: Settings,
                       name: Callable[[int], str], prefix: str) -> np.ndarray:
    """uint8 [n, height, width, channels] of files (within /predict's limits) or arrays,
    decoded as /predict decodes them; errors name item i `name(i)`, or start with `prefix`."""
    try:
        if not items or isinstance(items[0], bytes):
            images.check(items, settings)
        return await images.decode(bundle, items)
    except ApiError as err:  # serving/api/images.py calls item i `images[i]`
        item = err.details.get("item")
        err.message = (f"{prefix}: {err.message}" if item is None
                       else err.message.replace(f"images[{item}]", name(item), 1))
        raise err from None


def at_most(count: int, settings: Settings, prefix: str) -> None:
    """/predict's limit on images per request, checked before any is decoded."""
    if count > settings.max_images:
        raise ApiError(422, "too_many_images", f"{prefix}: {count} images; at most "
                       f"{settings.max_images} per request")


def pixel_shape(tensor: InferInput, settings: Settings, max_pixels: int) -> list[int]:
    """[N, height, width, channels] of a `pixels` tensor, within the limits."""
    shape = tensor.shape
    if len(shape) != 4 or min(shape) < 1 or shape[3] not in (1, 3, 4):
        raise bad_request(f"input 'pixels' has shape {shape}: expected [N, height, width, "
                          "channels], channels 1, 3 or 4")
    n, height, width, channels = shape
    at_most(n, settings, "input 'pixels'")
    for size, limit, unit in ((height * width, max_pixels, "pixels"),
                              (height * width * channels, settings.max_image_bytes, "bytes")):
        if size > limit:
            raise ApiError(413, "image_too_large", f"input 'pixels': {height}x{width}x"
                           f"{channels}: {size} {unit} per image; at most {limit}")
    return shape


def pixel_array(tensor: InferInput, shape: list[int]) -> np.ndarray:
    """The tensor's data as uint8 `shape`; 400 naming the element (image) holding a
    value that is not an integer 0..255. On a worker thread: it walks every value."""
    values = counted(tensor, flatten(tensor.data))
    array = np.asarray(values)
    if array.dtype.kind in "iu" and array.min() >= 0 and array.max() <= 255:
        return array.astype(np.uint8).reshape(shape)
    bad = next(i for i, v in enumerate(values) if type(v) is not int or not 0 <= v <= 255)
    raise bad_request(f"input 'pixels' element {bad // prod(shape[1:])}: value {values[bad]!r} "
                      f"at flat index {bad}; UINT8 values are integers 0..255")


async def image_inputs(request: InferRequest, bundle: Bundle, settings: Settings
                       ) -> tuple[list[np.ndarray], list[str]]:
    """The request's images as the model's uint8 pixels, and their prediction log keys
    (`images.log_keys`): a file's sha256 as /predict logs it; a tensor's raw bytes'
    sha256 and its shape."""
    tensor = the_input(request, IMAGE_INPUTS)
    name = f"input {tensor.name!r} element {{}}".format
    if tensor.name == "image":
        texts = counted(tensor, flatten(tensor.data))
        at_most(len(texts), settings, "input 'image'")
        files = [b64_file(text, name(i)) for i, text in enumerate(texts)]
        pixels = await image_pixels(bundle, files, settings, name, "input 'image'")
        return list(pixels), await images.log_keys(
            images.file_keys(files), pixels, settings.prediction_log_images)
    shape = pixel_shape(tensor, settings, bundle.inputs.spec.max_pixels)
    sent = await asyncio.to_thread(pixel_array, tensor, shape)
    pixels = await image_pixels(bundle, list(sent), settings, name, "input 'pixels'")
    keys = [f"sha256:{hashlib.sha256(one.tobytes()).hexdigest()}:uint8"
            f"[{','.join(map(str, one.shape))}]" for one in sent]
    return list(pixels), await images.log_keys(keys, pixels, settings.prediction_log_images)
