"""Image preprocessing a bundle carries: decoding what users upload, refusing what is not
a usable image (naming it), the mode and resize policies, and normalisation that gives
training and serving the same bytes."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image, ImageFile

from serving.bundle.images import ImageError, ImageSpec, brightness_contrast, channel_stats

RNG = np.random.default_rng(0)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(height: int, width: int, channels: int = 3) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, channels), dtype=np.uint8)


# ---------------------------------------------------------------- decoding


def test_a_png_decodes_to_its_exact_pixels():
    pixels = noise(6, 5)
    out = ImageSpec(6, 5, 3).decode(encode(Image.fromarray(pixels)), "a.png")
    assert out.dtype == np.uint8 and out.shape == (6, 5, 3)
    np.testing.assert_array_equal(out, pixels)


def test_a_jpeg_decodes_close_to_its_colour():
    image = Image.new("RGB", (16, 16), (200, 40, 90))
    out = ImageSpec(16, 16, 3).decode(encode(image, "JPEG", quality=95), "a.jpg")
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - [200, 40, 90]).max() <= 3


def test_transparent_pixels_become_white():
    pixels = np.zeros((2, 2, 4), np.uint8)
    pixels[0, 0] = (10, 20, 30, 255)  # opaque: kept
    pixels[1, 1] = (10, 20, 30, 0)  # transparent: white, whatever its colour
    out = ImageSpec(2, 2, 3).decode(encode(Image.fromarray(pixels, "RGBA")), "a.png")
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[1, 1].tolist() == [255, 255, 255]
    gray = ImageSpec(2, 2, 1).decode(encode(Image.fromarray(pixels, "RGBA")), "a.png")
    assert gray[1, 1, 0] == 255


def test_a_palette_image_converts_and_its_transparent_index_is_white():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    out = ImageSpec(1, 2, 3).decode(encode(image), "p.png")
    assert out[0].tolist() == [[255, 0, 0], [0, 0, 255]]
    out = ImageSpec(1, 2, 3).decode(encode(image, transparency=1), "p.png")
    assert out[0].tolist() == [[255, 0, 0], [255, 255, 255]]


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    wide = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    image = Image.fromarray(wide)
    assert image.mode == "I;16"
    out = ImageSpec(1, 3, 1).decode(encode(image), "depth.png")
    assert out[0, :, 0].tolist() == [0, 100, 255]
    rgb = ImageSpec(1, 3, 3).decode(encode(image), "depth.png")
    assert rgb[0, 1].tolist() == [100, 100, 100]


@pytest.mark.parametrize("mode", ["1", "L", "LA", "CMYK", "YCbCr", "I", "F", "RGB"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_gives_the_spec_channels(mode, channels):
    image = Image.new(mode, (5, 3))
    out = ImageSpec(4, 4, channels).from_image(image)
    assert out.shape == (4, 4, channels) and out.dtype == np.uint8


def test_the_first_frame_of_an_animation():
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = ImageSpec(4, 4, 3).decode(data, "anim.gif")
    assert (out == [255, 0, 0]).all()


def test_exif_orientation_makes_the_photo_upright():
    pixels = np.zeros((2, 4), np.uint8)
    pixels[:, 2:] = 255  # stored 4 wide, 2 high: dark left, bright right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(Image.fromarray(pixels), exif=exif)
    out = ImageSpec(4, 2, 1).decode(data, "phone.png")
    np.testing.assert_array_equal(out[:, :, 0], np.rot90(pixels, k=-1))


def test_a_truncated_png_is_named():
    data = encode(Image.fromarray(noise(64, 64)))
    with pytest.raises(ImageError, match=r"^cat\.png: truncated or corrupt") as err:
        ImageSpec(8, 8, 3).decode(data[: len(data) // 2], "cat.png")
    assert err.value.item == "cat.png"


def test_bytes_that_are_no_image_are_named():
    with pytest.raises(ImageError, match=r"^upload 3: not an image Pillow can read$"):
        ImageSpec(8, 8, 3).decode(RNG.bytes(500), "upload 3")


def test_an_oversized_image_is_refused_from_its_header_before_decoding(monkeypatch):
    data = encode(Image.new("L", (200, 200)))

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError, match=r"^big\.png: decodes to 200x200 = 40000 pixels, "
                                         r"over the limit of 10000$"):
        ImageSpec(8, 8, 1, max_pixels=10_000).decode(data, "big.png")


def test_pillows_own_bomb_warning_is_a_refusal(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)
    data = encode(Image.new("L", (200, 200)))  # between Pillow's limit and twice it
    with pytest.raises(ImageError, match="decompression bomb"):
        ImageSpec(8, 8, 1).decode(data, "bomb.png")
    assert Image.MAX_IMAGE_PIXELS == 30_000  # the global is left alone


def test_image_errors_survive_pickling():
    err = pickle.loads(pickle.dumps(ImageError("a.png", "broken")))
    assert (err.item, err.reason, str(err)) == ("a.png", "broken", "a.png: broken")


# ---------------------------------------------------------------- resizing


def bars() -> np.ndarray:
    """4 high, 8 wide: dark outer quarters, bright middle half."""
    pixels = np.zeros((4, 8), np.uint8)
    pixels[:, 2:6] = 200
    return pixels


def test_crop_covers_the_target_and_keeps_the_centre():
    out = ImageSpec(4, 4, 1, resize="crop").from_array(bars())
    assert out.shape == (4, 4, 1)
    assert (out == 200).all()  # the dark sides were cropped away


def test_stretch_squeezes_the_whole_image_in():
    out = ImageSpec(4, 4, 1, resize="stretch").from_array(bars())
    assert out.shape == (4, 4, 1)
    assert (out == out[:1]).all()  # every row alike: no padding
    assert out[0, 0, 0] < 100 and out[0, 3, 0] < 100  # the dark sides are still there
    assert (out[0, 1:3] > 150).all()


def test_pad_keeps_the_aspect_ratio_and_fills():
    square = np.full((2, 2, 3), 100, np.uint8)
    out = ImageSpec(4, 8, 3, resize="pad", fill=7).from_array(square)
    expected = np.full((4, 8, 3), 7, np.uint8)
    expected[:, 2:6] = 100  # scaled to 4x4, centred
    np.testing.assert_array_equal(out, expected)


def test_the_right_size_is_not_resampled(monkeypatch):
    pixels = noise(5, 7)

    def no_resize(*args, **kwargs):
        raise AssertionError("resampled")

    monkeypatch.setattr(Image.Image, "resize", no_resize)
    spec = ImageSpec(5, 7, 3)
    np.testing.assert_array_equal(spec.from_image(Image.fromarray(pixels)), pixels)
    view = np.asfortranarray(pixels)
    out = spec.from_array(view)
    np.testing.assert_array_equal(out, pixels)
    assert out.flags.c_contiguous


def test_from_array_converts_channels_and_refuses_other_arrays():
    gray = ImageSpec(3, 3, 3).from_array(np.full((3, 3), 50, np.uint8))
    assert (gray == 50).all() and gray.shape == (3, 3, 3)
    with pytest.raises(ImageError, match=r"^x: pixels must be a uint8 array, not float32"):
        ImageSpec(3, 3, 3).from_array(np.zeros((3, 3), np.float32), "x")
    with pytest.raises(ImageError, match=r"shape \[3, 3, 2\]"):
        ImageSpec(3, 3, 3).from_array(np.zeros((3, 3, 2), np.uint8), "x")


# ---------------------------------------------------------------- tensors and statistics


def test_normalise_gives_the_documented_values():
    spec = ImageSpec(1, 2, 3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    pixels = np.array([[[[255, 0, 51], [0, 255, 102]]]], np.uint8)
    out = spec.normalise(pixels)
    assert out.dtype == np.float32 and out.shape == (1, 3, 1, 2)
    np.testing.assert_allclose(out[0, :, 0, 0], [2.0, -2.0, -1.2], rtol=1e-6)


def test_normalise_is_the_reference_formula_bit_for_bit():
    spec = ImageSpec(6, 5, 3, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    pixels = RNG.integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
    mean, std = np.float32(spec.mean), np.float32(spec.std)
    reference = ((pixels.astype(np.float32) / np.float32(255) - mean) / std).transpose(0, 3, 1, 2)
    out = spec.normalise(pixels)
    assert out.tobytes() == np.ascontiguousarray(reference).tobytes()
    with pytest.raises(ValueError, match=r"expected uint8 \[N, 6, 5, 3\]"):
        spec.normalise(pixels[:, :5])


def test_channel_stats_match_numpy_and_do_not_depend_on_chunks():
    pixels = RNG.integers(0, 256, (7, 4, 3, 3), dtype=np.uint8)
    mean, std = channel_stats(pixels)
    scaled = pixels / 255
    np.testing.assert_allclose(mean, scaled.mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(std, scaled.std(axis=(0, 1, 2)), atol=1e-6)
    assert channel_stats(pixels, chunk=2) == (mean, std)


def test_brightness_and_contrast_per_image():
    pixels = np.zeros((2, 2, 2, 1), np.uint8)
    pixels[1, 0] = 255  # half white
    brightness, contrast = brightness_contrast(pixels)
    np.testing.assert_allclose(brightness, [0.0, 0.5])
    np.testing.assert_allclose(contrast, [0.0, 0.5])


# ---------------------------------------------------------------- the spec as JSON


def test_the_spec_round_trips_through_json():
    spec = ImageSpec(32, 32, 3, resize="pad", mean=(0.1, 0.2, 0.3), std=(1, 2, 3), fill=9)
    again = ImageSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert spec.to_dict()["mean"] == [0.1, 0.2, 0.3]
    stats = spec.with_stats((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    assert stats.mean == (0.5, 0.5, 0.5) and spec.mean == (0.1, 0.2, 0.3)


@pytest.mark.parametrize("change,field", [
    ({"channels": 2}, "channels"),
    ({"resize": "zoom"}, "resize"),
    ({"mean": [0.1, 0.2]}, "mean"),
    ({"std": [1.0, 0.0, 1.0]}, "std"),
    ({"height": 0}, "height"),
    ({"fill": 300}, "fill"),
    ({"colour": "red"}, "colour"),
])
def test_a_bad_field_is_named(change, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        ImageSpec.from_dict({"height": 8, "width": 8, "channels": 3, **change})


def test_a_missing_field_is_named():
    with pytest.raises(ValueError, match="^width: missing"):
        ImageSpec.from_dict({"height": 8, "channels": 1})
