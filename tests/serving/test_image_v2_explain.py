"""An image bundle through the Open Inference Protocol (V2) and /explain, over real HTTP:
V2 takes base64 files (BYTES) or pixel tensors (UINT8 [N, H, W, C], any size) and
answers as /predict does; bad elements are refused by name before reaching the model;
/explain's saliency grid is the occlusion drop the bundle itself gives offline.

The bundle is the image smoke experiment's (`image_repo`: Fashion-MNIST, 28x28
grayscale, served int8)."""

from __future__ import annotations

import base64
import hashlib
import io
import sqlite3

import httpx
import numpy as np
import pytest
from conftest import eventually
from PIL import Image

from serving.bundle import Bundle, softmax

pytestmark = pytest.mark.slow


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def bundle(image_bundle):
    return Bundle.load(image_bundle)  # int8, as served


@pytest.fixture(scope="module")
def infer_url(image_service, bundle):
    return f"{image_service.url}/v2/models/{bundle.meta['model_name']}/infer"


def predict(url: str, files: list[bytes]) -> list[dict]:
    response = httpx.post(f"{url}/predict", json={"images": [b64(f) for f in files]},
                          timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def v2(url: str, name: str, datatype: str, shape: list[int], data: list) -> httpx.Response:
    tensor = {"name": name, "datatype": datatype, "shape": shape, "data": data}
    return httpx.post(url, json={"inputs": [tensor]}, timeout=30)


def assert_same_answers(response: httpx.Response, expected: list[dict], labels: list[str]):
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["label"]["data"] == [p["label"] for p in expected]
    probs = np.array(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])
    served = np.array([[p["probabilities"][n] for n in labels] for p in expected])
    assert probs.shape == served.shape and np.abs(probs - served).max() < 1e-6


def test_v2_bytes_and_uint8_tensors_answer_as_predict(image_service, infer_url, bundle, garments):
    expected = predict(image_service.url, garments)
    files = v2(infer_url, "image", "BYTES", [4], [b64(g) for g in garments])
    assert_same_answers(files, expected, bundle.label_names)
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(g)).convert("L")) for g in garments])
    tensor = v2(infer_url, "pixels", "UINT8", [4, 28, 28, 1], pixels.ravel().tolist())
    assert_same_answers(tensor, expected, bundle.label_names)
    # nested row-major data, as V2 allows, is the same tensor
    nested = v2(infer_url, "pixels", "UINT8", [4, 28, 28, 1], pixels.tolist())
    assert_same_answers(nested, expected, bundle.label_names)


def test_v2_converts_an_rgb_tensor_of_another_size_as_predict_converts_a_file(
        image_service, infer_url, bundle):
    rgb = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    rgb[8:22, 12:28] = (250, 240, 230)  # a light block on noise: not a flat answer
    expected = predict(image_service.url, [png(Image.fromarray(rgb))])  # PNG is lossless
    response = v2(infer_url, "pixels", "UINT8", [1, 30, 40, 3], rgb.ravel().tolist())
    assert_same_answers(response, expected, bundle.label_names)
    # logged as the sha256 of the tensor's bytes and its shape, never the pixels
    rid = response.json()["parameters"]["request_id"]
    key = f"sha256:{hashlib.sha256(rgb.tobytes()).hexdigest()}:uint8[30,40,3]"

    def logged():
        with sqlite3.connect(image_service.log_dir / "predictions.db") as db:
            return db.execute("select text from predictions where request_id = ?",
                              (rid,)).fetchall()

    assert eventually(logged) == [(key,)]


def test_v2_metadata_describes_both_image_inputs(image_service, bundle):
    name = bundle.meta["model_name"]
    metadata = httpx.get(f"{image_service.url}/v2/models/{name}").json()
    assert metadata["inputs"] == [
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
        {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, -1]}]
    assert metadata["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "label", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["parameters"]["image_size"] == {"height": 28, "width": 28,
                                                    "channels": 1, "resize": "crop"}


def batches(url: str) -> str:
    metrics = httpx.get(f"{url}/metrics").text
    return next(line for line in metrics.splitlines()
                if line.startswith("textops_batch_texts_count"))


@pytest.mark.parametrize("tensor,status,words", [
    (lambda g: ("image", "BYTES", [2], [b64(g[0]), b64(b"not an image")]), 400,
     "input 'image' element 1: not an image Pillow can read"),
    (lambda g: ("image", "BYTES", [2], [b64(g[0]), "not base64!"]), 400,
     "input 'image' element 1 is not valid base64"),
    (lambda g: ("image", "BYTES", [2], [b64(g[0]), b64(b"x" * 200_001)]), 413,
     "input 'image' element 1 has 200001 bytes; at most 200000"),
    (lambda g: ("image", "BYTES", [5], [b64(g[0])] * 4 + ["not base64!"]), 400,
     "input 'image': 5 images; at most 4"),  # counted before any element is decoded
    (lambda g: ("image", "UINT8", [1, 1, 1, 1], [0]), 400,
     "input 'image' must be BYTES, not UINT8"),
    (lambda g: ("pixels", "FP32", [1, 1, 1, 1], [0.5]), 400,
     "input 'pixels' must be UINT8, not FP32"),
    (lambda g: ("pixels", "UINT8", [1, 2, 2, 2], [0] * 8), 400,
     "input 'pixels' has shape [1, 2, 2, 2]: expected [N, height, width, channels]"),
    (lambda g: ("pixels", "UINT8", [2, 2, 2], [0] * 8), 400,
     "input 'pixels' has shape [2, 2, 2]"),
    (lambda g: ("pixels", "UINT8", [2, 2, 2, 1], [0] * 7), 400,
     "input 'pixels' has shape [2, 2, 2, 1] but 7 elements"),
    (lambda g: ("pixels", "UINT8", [2, 2, 2, 1], [0] * 5 + [256, 0, 0]), 400,
     "input 'pixels' element 1: value 256 at flat index 5"),
    (lambda g: ("pixels", "UINT8", [2, 2, 2, 1], [0] * 6 + [1.5, 0]), 400,
     "input 'pixels' element 1: value 1.5 at flat index 6"),
    (lambda g: ("pixels", "UINT8", [5, 1, 1, 1], [0] * 5), 400,
     "input 'pixels': 5 images; at most 4"),
    (lambda g: ("pixels", "UINT8", [1, 7000, 7000, 1], [0]), 413,
     "input 'pixels': 7000x7000x1: 49000000 pixels per image; at most 40000000"),
    (lambda g: ("pixels", "UINT8", [1, 300, 300, 3], [0]), 413,
     "input 'pixels': 300x300x3: 270000 bytes per image; at most 200000"),
], ids=["not_an_image", "not_base64", "too_many_bytes", "too_many_files", "image_as_uint8",
        "pixels_as_fp32", "two_channels", "three_dims", "too_few_values", "over_255",
        "not_an_integer", "too_many_tensors", "over_max_pixels", "over_max_bytes"])
def test_v2_refuses_bad_elements_by_name(image_service, infer_url, garments, tensor, status, words):
    before = batches(image_service.url)
    response = v2(infer_url, *tensor(garments))
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}  # the protocol's error shape
    assert words in response.json()["error"]
    assert batches(image_service.url) == before  # nothing of it reached the model


# ---------------------------------------------------------------- /explain


def occluded_drop(bundle: Bundle, file: bytes, row: int, col: int, size: int) -> float:
    """The label's probability drop when one cell is set to the mean, computed offline."""
    image = bundle.inputs.spec.normalise(bundle.inputs.pixels([file]))
    probs = softmax(bundle.run(list(image)))[0]
    label = int(probs.argmax())
    image[0, :, row * size:(row + 1) * size, col * size:(col + 1) * size] = 0.0
    return float(probs[label] - softmax(bundle.run(list(image)))[0, label])


def explain(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/explain", json=body, timeout=60)


def test_explain_gives_the_occlusion_saliency_of_the_bundle(image_service, bundle, garments):
    response = explain(image_service.url, {"image": b64(garments[1])})
    assert response.status_code == 200, response.text
    body = response.json()
    (expected,) = predict(image_service.url, garments[1:2])
    assert body["label"] == expected["label"]
    assert abs(body["score"] - expected["score"]) < 1e-6
    saliency = body["saliency"]
    assert (saliency["rows"], saliency["cols"]) == (7, 7)
    assert (saliency["cell_height"], saliency["cell_width"]) == (4, 4)
    values = np.array(saliency["values"])
    assert values.shape == (7, 7) and np.abs(values).max() > 0
    row, col = np.unravel_index(values.argmax(), values.shape)
    assert values[row, col] > 0  # some part of the garment supports its label
    assert values[row, col] == pytest.approx(
        occluded_drop(bundle, garments[1], row, col, 4), abs=2e-6)
    # and as a client sees it: the image with that cell gray, through /predict
    pixels = bundle.inputs.pixels([garments[1]])[0, :, :, 0].copy()
    pixels[row * 4:(row + 1) * 4, col * 4:(col + 1) * 4] = round(bundle.inputs.spec.mean[0]
                                                                 * 255)
    (grayed,) = predict(image_service.url, [png(Image.fromarray(pixels))])
    dropped = expected["score"] - grayed["probabilities"][expected["label"]]
    assert dropped == pytest.approx(values[row, col], abs=0.01)


def test_explain_takes_a_cell_size(image_service, bundle, garments):
    body = explain(image_service.url, {"image": b64(garments[0]), "cell_size": 10}).json()
    saliency = body["saliency"]
    assert (saliency["rows"], saliency["cols"], saliency["cell_height"]) == (3, 3, 10)
    values = np.array(saliency["values"])
    assert values.shape == (3, 3)
    # the last row and column are cut short by the edge: 8 pixels, not 10
    assert values[2, 2] == pytest.approx(occluded_drop(bundle, garments[0], 2, 2, 10),
                                         abs=2e-6)


@pytest.mark.parametrize("body,status,words", [
    ({"text": "a shirt"}, 422, "text: this model classifies images"),
    ({"image": "not base64!"}, 422, "image is not valid base64"),
    ({"image": b64(b"not an image")}, 422, "image: not an image Pillow can read"),
    ({"image": b64(b"x" * 200_001)}, 413, "image has 200001 bytes; at most 200000"),
    ({"image": b64(b"x"), "cell_size": 0}, 422, "cell_size: Input should be greater"),
], ids=["text", "not_base64", "not_an_image", "too_many_bytes", "cell_size"])
def test_explain_refuses_what_is_not_an_image_by_name(image_service, body, status, words):
    response = explain(image_service.url, body)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_a_text_model_refuses_an_image_to_explain_by_name(live_service):
    response = explain(live_service.url, {"image": b64(b"x")})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "image"
    assert "image: this model classifies texts" in response.json()["error"]
