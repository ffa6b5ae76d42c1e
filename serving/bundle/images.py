"""The image preprocessing a bundle carries: bytes or pixels in, the model's input out.

The training pipeline and the service both turn images into tensors through an
`ImageSpec`, so what a model saw in training is, byte for byte, what it sees when
served. Decoding refuses what is not a usable image (`ImageError`, naming the item),
including decompression bombs, checked from the header before any pixel is decoded.

numpy and Pillow only: no torch, nothing from `pipeline/`.
"""

from __future__ import annotations

import base64
import io
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

RESIZE = ("crop", "stretch", "pad")
MODES = {1: "L", 3: "RGB"}
# Pillow modes whose samples run over 16 bits: scaled to 8 bits, where Pillow's own
# convert("L") would clip everything above 255 to white.
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Values per step when a statistic walks the pixels: bounds the float64 temporaries.
STEP_VALUES = 1 << 22


class ImageError(ValueError):
    """An input that is not a usable image; the message names the item."""

    def __init__(self, item: str, reason: str):
        super().__init__(f"{item}: {reason}")
        self.item = item
        self.reason = reason

    def __reduce__(self):
        # Data loader workers send errors back pickled; the default would call __init__
        # with the message alone.
        return type(self), (self.item, self.reason)


@dataclass(frozen=True)
class ImageSpec:
    """What a model takes: size, channels, how to resize, and the normalisation."""

    height: int
    width: int
    channels: int  # 1 (grayscale) or 3 (RGB)
    resize: str = "crop"  # crop | stretch | pad
    mean: tuple[float, ...] = (0.0,)  # per channel, on pixel values scaled to 0..1
    std: tuple[float, ...] = (1.0,)
    max_pixels: int = 40_000_000  # decoded width * height above this is refused
    fill: int = 0  # pad colour (0..255) for resize="pad"

    def __post_init__(self):
        for name in ("height", "width", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, not {value!r}")
        if self.channels not in MODES:
            raise ValueError(f"channels: must be 1 or 3, not {self.channels!r}")
        if self.resize not in RESIZE:
            raise ValueError(f"resize: must be one of {', '.join(RESIZE)}, not {self.resize!r}")
        if not isinstance(self.fill, int) or not 0 <= self.fill <= 255:
            raise ValueError(f"fill: must be an integer in 0..255, not {self.fill!r}")
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            # One value stands for every channel, so ImageSpec(32, 32, 3) is valid.
            values = values * self.channels if len(values) == 1 else values
            if len(values) != self.channels:
                raise ValueError(f"{name}: {len(values)} values for {self.channels} channels")
            if not all(np.isfinite(values)) or (name == "std" and min(values) <= 0):
                raise ValueError(f"{name}: values must be finite{' and > 0' * (name == 'std')}")
            object.__setattr__(self, name, values)

    @classmethod
    def from_dict(cls, d: dict) -> ImageSpec:
        """The spec a bundle's JSON holds; ValueError names a missing or bad field."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not image spec fields ({', '.join(known)})")
        missing = [name for name in ("height", "width", "channels") if name not in d]
        if missing:
            raise ValueError(f"{', '.join(missing)}: missing from the image spec")
        return cls(**d)

    def to_dict(self) -> dict:
        data = asdict(self)
        return {**data, "mean": list(self.mean), "std": list(self.std)}

    def with_stats(self, mean, std) -> ImageSpec:
        return replace(self, mean=tuple(mean), std=tuple(std))

    # ------------------------------------------------------------ pixels in

    def decode(self, data: bytes, item: str) -> np.ndarray:
        """Encoded file bytes -> uint8 [height, width, channels] (first frame, upright)."""
        return self.load(self.open(data, item), item)

    def open(self, data: bytes, item: str) -> Image.Image:
        """The file with only its header read, refused (ImageError) when it is not an
        image or decodes to more than `max_pixels`; `load` decodes it."""
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
                raise ImageError(item, f"refused as a decompression bomb ({err})") from None
            except UnidentifiedImageError:
                raise ImageError(item, "not an image Pillow can read") from None
            except Exception as err:  # a plugin that knew the format failing on its header
                raise ImageError(item, f"not an image Pillow can read ({err})") from None
        width, height = image.size
        if width * height > self.max_pixels:
            image.close()
            raise ImageError(item, f"decodes to {width}x{height} = {width * height} pixels, "
                                   f"over the limit of {self.max_pixels}")
        return image

    def load(self, image: Image.Image, item: str) -> np.ndarray:
        """An image from `open`, decoded (and closed): uint8 [height, width, channels],
        its first frame, upright."""
        with warnings.catch_warnings(), image:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image.load()  # decodes the first frame only
                # A phone photo stored sideways with an EXIF tag is upright as its user
                # saw it (in place: a copy of every image cost a tenth of its decoding).
                ImageOps.exif_transpose(image, in_place=True)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
                raise ImageError(item, f"refused as a decompression bomb ({err})") from None
            except Exception as err:  # Pillow's decoders raise OSError, ValueError, ...
                raise ImageError(item, f"truncated or corrupt image data ({err})") from None
            return self.from_image(image, item)

    def from_image(self, image: Image.Image, item: str = "image") -> np.ndarray:
        """A Pillow image -> uint8 [height, width, channels] by the mode and resize policy."""
        try:
            image = self._convert(image)
        except ValueError as err:  # a mode Pillow cannot convert (LAB, HSV, ...)
            raise ImageError(item, f"cannot convert mode {image.mode} ({err})") from None
        if image.size != (self.width, self.height):
            image = self._resize(image)
        pixels = np.asarray(image, dtype=np.uint8)
        return np.ascontiguousarray(pixels.reshape(self.height, self.width, self.channels))

    def from_array(self, pixels: np.ndarray, item: str = "image") -> np.ndarray:
        """uint8 [H, W] or [H, W, C] (C of 1, 3, 4) -> uint8 [height, width, channels]."""
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
            dtype = getattr(pixels, "dtype", type(pixels).__name__)
            raise ImageError(item, f"pixels must be a uint8 array, not {dtype}")
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
            raise ImageError(item, f"pixels of shape {list(pixels.shape)}: expected "
                                   "[height, width] or [height, width, 1|3|4]")
        if pixels.shape == (self.height, self.width, self.channels):
            return np.ascontiguousarray(pixels)
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
        plane = pixels[:, :, 0] if mode == "L" else pixels
        return self.from_image(Image.fromarray(np.ascontiguousarray(plane), mode=mode), item)

    def _convert(self, image: Image.Image) -> Image.Image:
        target = MODES[self.channels]
        if image.mode in WIDE_MODES:
            wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
            image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")
        elif image.mode == "F":
            # Float samples are taken on the 0..255 scale, as Pillow's own convert does.
            flat = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255)
            image = Image.fromarray(flat.astype(np.uint8), mode="L")
        elif image.has_transparency_data:
            # Transparent areas become white, as a browser shows them on a plain page.
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image.convert("RGBA"))
        return image if image.mode == target else image.convert(target)

    def _resize(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        size = (self.width, self.height)
        if self.resize == "stretch":
            return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
        if self.resize == "crop":
            return image.resize(size, Image.Resampling.BILINEAR, box=self._crop_box(width, height),
                                reducing_gap=None)
        scale = min(self.width / width, self.height / height)
        inner = (min(self.width, max(1, round(width * scale))),
                 min(self.height, max(1, round(height * scale))))
        if inner != image.size:
            image = image.resize(inner, Image.Resampling.BILINEAR, reducing_gap=None)
        colour = self.fill if self.channels == 1 else (self.fill,) * 3
        canvas = Image.new(image.mode, size, colour)
        canvas.paste(image, ((self.width - inner[0]) // 2, (self.height - inner[1]) // 2))
        return canvas

    def _crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The centred part of the source with the target's aspect ratio: resizing just it
        equals scaling the whole image to cover the target and cropping the overflow."""
        if width * self.height > height * self.width:  # wider than the target
            kept = height * self.width / self.height
            return ((width - kept) / 2, 0.0, (width + kept) / 2, float(height))
        kept = width * self.height / self.width
        return (0.0, (height - kept) / 2, float(width), (height + kept) / 2)

    # ------------------------------------------------------------ tensors out

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, height, width, channels] -> float32 [N, channels, height, width].

        (x / 255 - mean) / std in float32, always in this order: the training data
        loader calls this very function, so training and serving give identical bytes.
        """
        expected = (self.height, self.width, self.channels)
        if pixels.ndim != 4 or pixels.shape[1:] != expected or pixels.dtype != np.uint8:
            raise ValueError(f"pixels of shape {list(pixels.shape)} and dtype {pixels.dtype}: "
                             f"expected uint8 [N, {', '.join(map(str, expected))}]")
        x = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)
        np.divide(x, np.float32(255), out=x)
        np.subtract(x, np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1), out=x)
        np.divide(x, np.asarray(self.std, np.float32).reshape(1, -1, 1, 1), out=x)
        return x


def _steps(pixels: np.ndarray, chunk: int):
    """Slices of at most `chunk` images, and of at most STEP_VALUES values."""
    per_image = max(1, int(np.prod(pixels.shape[1:])))
    step = max(1, min(chunk, STEP_VALUES // per_image))
    for start in range(0, len(pixels), step):
        yield pixels[start:start + step]


def channel_stats(
    pixels: np.ndarray, chunk: int = 4096
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 [N, H, W, C] on the 0..1 scale.

    Sums of whole numbers in float64 are exact, so the result does not depend on the
    chunking; rounding to 6 decimals keeps spec.json stable across machines.
    """
    if pixels.ndim != 4 or pixels.dtype != np.uint8 or not pixels.size:
        raise ValueError(f"pixels must be non-empty uint8 [N, H, W, C], not "
                         f"{pixels.dtype} {list(pixels.shape)}")
    total = np.zeros(pixels.shape[3])
    squares = np.zeros(pixels.shape[3])
    for part in _steps(pixels, chunk):
        values = part.astype(np.float64)
        total += values.sum(axis=(0, 1, 2))
        squares += np.square(values).sum(axis=(0, 1, 2))
    count = pixels.shape[0] * pixels.shape[1] * pixels.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return (tuple(round(float(m) / 255, 6) for m in mean),
            tuple(round(float(s) / 255, 6) for s in std))


def brightness_contrast(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the mean and std of its pixels (all channels) on 0..1: drift features."""
    means, stds = [], []
    for part in _steps(pixels, len(pixels) or 1):
        values = part.reshape(len(part), -1).astype(np.float64) / 255
        means.append(values.mean(axis=1))
        stds.append(values.std(axis=1))
    if not means:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(means), np.concatenate(stds)


# How the prediction log keeps an image under the `thumbnail` policy, and how collect
# reads it back as feedback: the pixels the model took, as a lossless PNG data URI.
THUMBNAIL_PREFIX = "data:image/png;base64,"


def thumbnail(pixels: np.ndarray) -> str:
    """One uint8 [h, w, c] image as a PNG data URI."""
    out = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(out, format="PNG")
    return THUMBNAIL_PREFIX + base64.b64encode(out.getvalue()).decode("ascii")
