"""The service serving an image bundle, through real HTTP: base64 and multipart
uploads, the limits and bad files (each named, none reaching the model), the
prediction log keeping hashes rather than images, and drift on predicted classes.

The bundle is the image smoke experiment's (`image_repo`: Fashion-MNIST, 28x28
grayscale)."""

from __future__ import annotations

import base64
import hashlib
import io
import sqlite3

import httpx
import numpy as np
import pytest
from conftest import eventually, running_service
from PIL import Image

from serving.bundle import Bundle

pytestmark = pytest.mark.slow


def png(image: Image.Image, kind: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, kind)
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_base64_images_get_the_bundles_offline_answers(image_service, image_bundle, garments):
    response = httpx.post(f"{image_service.url}/predict",
                          json={"images": [b64(g) for g in garments]}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    bundle = Bundle.load(image_bundle)  # int8, as served
    expected = bundle.predict_proba(garments)
    for answer, probs in zip(body["predictions"], expected, strict=True):
        assert answer["label"] == bundle.label_names[int(probs.argmax())]
        served = np.array([answer["probabilities"][n] for n in bundle.label_names])
        assert np.abs(served - probs).max() < 1e-5
    assert body["request_id"] == response.headers["x-request-id"]


def test_multipart_uploads_of_other_sizes_and_modes_are_converted(image_service, image_bundle,
                                                                 garments):
    # an RGBA JPEG-sized colour picture and a palette GIF: converted to 28x28 grayscale
    # (more pixels than the event loop decodes itself: they decode on a worker thread)
    rgba = Image.new("RGBA", (300, 200), (200, 30, 30, 255))
    palette = Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)).convert("P")
    files = [("images", ("a.png", garments[0], "image/png")),
             ("images", ("b.png", png(rgba), "image/png")),
             ("images", ("c.jpg", png(rgba.convert("RGB"), "JPEG"), "image/jpeg")),
             ("images", ("d.gif", png(palette, "GIF"), "image/gif"))]
    response = httpx.post(f"{image_service.url}/predict", files=files, timeout=30)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 4
    one = httpx.post(f"{image_service.url}/predict", json={"images": [b64(garments[0])]})
    assert response.json()["predictions"][0] == one.json()["predictions"][0]
    bundle = Bundle.load(image_bundle)
    offline = bundle.predict_proba([png(rgba)])[0]
    served = response.json()["predictions"][1]["probabilities"]
    assert np.abs(np.array([served[n] for n in bundle.label_names]) - offline).max() < 1e-5


def noise() -> bytes:
    """A PNG file of 120 KB: more bytes than a request decodes on the event loop."""
    pixels = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    return png(Image.fromarray(pixels))


def bomb() -> bytes:
    """A small PNG file that decodes to 7,000 x 7,000 = 49 million pixels, over the
    bundle's max_pixels (40 million)."""
    return png(Image.new("1", (7000, 7000)))


@pytest.mark.parametrize("make,status,code,words", [
    (lambda g: [g[0], g[1][:200]], 422, "invalid_image", "images[1]: truncated or corrupt"),
    (lambda g: [b"this is not an image"], 422, "invalid_image",
     "images[0]: not an image Pillow can read"),
    (lambda g: [noise(), g[1][:200]], 422, "invalid_image", "images[1]: truncated or corrupt"),
    (lambda g: [g[0], bomb()], 413, "image_too_large", "images[1]: decodes to 7000x7000"),
    (lambda g: g + g[:1], 422, "too_many_images", "5 images; at most 4"),
    (lambda g: [g[0], b"x" * 200_001], 413, "image_too_large", "images[1] has 200001 bytes"),
], ids=["truncated", "truncated_beside_a_large_one", "not_an_image", "bomb", "too_many",
        "too_many_bytes"])
def test_bad_images_are_refused_naming_the_item(image_service, garments, make, status, code,
                                                words):
    before = httpx.get(f"{image_service.url}/metrics").text
    response = httpx.post(f"{image_service.url}/predict",
                          json={"images": [b64(i) for i in make(garments)]}, timeout=30)
    assert response.status_code == status, response.text
    assert response.json()["code"] == code and words in response.json()["error"]
    after = httpx.get(f"{image_service.url}/metrics").text
    # nothing of a refused request reached the model
    assert batches(before) == batches(after)


def batches(metrics: str) -> str:
    return next(line for line in metrics.splitlines()
                if line.startswith("textops_batch_texts_count"))


def test_invalid_base64_and_wrong_fields_are_422(image_service):
    bad = httpx.post(f"{image_service.url}/predict", json={"images": ["not base64!"]})
    assert bad.status_code == 422 and "images[0] is not valid base64" in bad.json()["error"]
    texts = httpx.post(f"{image_service.url}/predict", json={"texts": ["a shirt"]})
    # an image model's body names images: a text body is told what is missing
    assert texts.status_code == 422 and texts.json()["error"] == "images: Field required"


def test_the_prediction_log_keeps_a_hash_never_the_image(image_service, garments):
    response = httpx.post(f"{image_service.url}/predict", json={"images": [b64(garments[2])]})
    rid = response.json()["request_id"]
    database = image_service.log_dir / "predictions.db"

    def logged():
        with sqlite3.connect(database) as db:
            return db.execute("select * from predictions where request_id = ?",
                              (rid,)).fetchall()

    row = eventually(logged)[0]
    digest = f"sha256:{hashlib.sha256(garments[2]).hexdigest()}"
    assert digest in row
    raw = database.read_bytes()
    assert b64(garments[2]).encode()[:40] not in raw and garments[2][16:64] not in raw


def test_feedback_on_an_image_answer_is_stored(image_service, garments):
    answer = httpx.post(f"{image_service.url}/predict", json={"images": [b64(garments[3])]})
    rid = answer.json()["request_id"]
    label = answer.json()["predictions"][0]["label"]
    response = httpx.post(f"{image_service.url}/feedback", json={"request_id": rid,
                                                                  "label": label})
    assert response.status_code == 200 and response.json()["accepted"] == 1


def test_metrics_show_image_drift(image_service, garments):
    httpx.post(f"{image_service.url}/predict", json={"images": [b64(g) for g in garments]})

    def drift_shown():
        metrics = httpx.get(f"{image_service.url}/metrics").text
        return metrics if "textops_drift_predicted_class_psi" in metrics else None

    metrics = eventually(drift_shown)
    assert 'textops_predicted_class_share{label="Trouser"}' in metrics
    assert "textops_drift_brightness_psi" in metrics
    assert "textops_drift_contrast_psi" in metrics
    assert "textops_drift_length_psi" not in metrics  # a text model's


def test_the_thumbnail_policy_logs_what_retraining_reads_back(image_bundle, garments,
                                                               tmp_path):
    """TEXTOPS_PREDICTION_LOG_IMAGES=thumbnail: the log keeps each image as the model
    took it, and a labelled one, exported as `make retrain` does, comes back from
    collect's reader with the very pixels the bundle saw and the label given."""
    from pipeline.data.feedback import export
    from pipeline.tasks.image_classification.feedback import read_feedback_images

    log = f"sqlite:///{tmp_path / 'predictions.db'}"
    with running_service(image_bundle, tmp_path, prediction_log=log,
                         prediction_log_images="thumbnail") as service:
        answer = httpx.post(f"{service.url}/predict",
                            json={"images": [b64(garments[0]), b64(garments[1])]}).json()
        rid = answer["request_id"]
        eventually(lambda: httpx.post(f"{service.url}/feedback", json={
            "request_id": rid, "position": 1, "label": "Bag"}).status_code == 200)
    export(log, tmp_path / "labelled.jsonl")
    bundle = Bundle.load(image_bundle, "fp32")
    split, read = read_feedback_images({"snapshot": "labelled.jsonl"}, bundle.inputs.spec,
                                       bundle.label_names, tmp_path)
    assert read["rows"] == 1 and read["hash_only_skipped"] == 0
    assert split["request_id"] == [rid] and split["position"] == [1]
    assert bundle.label_names[split["label"][0]] == "Bag"
    np.testing.assert_array_equal(np.asarray(split["pixels"][0], dtype=np.uint8),
                                  bundle.inputs.pixels([garments[1]])[0])
    # the row still names the file sent
    digest = hashlib.sha256(garments[1]).hexdigest()
    assert digest in (tmp_path / "labelled.jsonl").read_text()
