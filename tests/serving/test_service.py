"""The service over real HTTP: every endpoint and every kind of bad input."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from conftest import compose

from ops import control
from pipeline.tasks.parity import batch_tolerances
from serving.bundle import Bundle


@pytest.fixture(scope="module")
def client(live_service):
    with httpx.Client(base_url=live_service.url, timeout=30) as c:
        yield c


def test_health_metadata_and_docs(client, built_bundle):
    _, meta = built_bundle
    assert client.get("/health/live").json() == {"status": "live"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["model_version"] == meta["version"]
    metadata = client.get("/metadata").json()
    assert metadata["version"] == meta["version"]
    assert metadata["label_names"] == ["neg", "pos"] and metadata["precision"] == "int8"
    assert metadata["lineage"]["data_hash"] == "abc" and "metrics" in metadata
    assert metadata["registry"] is None  # a candidate: no registry has promoted it
    assert "swagger" in client.get("/docs").text.lower()
    paths = client.get("/openapi.json").json()["paths"]
    assert "/predict" in paths and "/feedback" in paths
    feedback_body = paths["/feedback"]["post"]["requestBody"]["content"]["application/json"]
    assert [kind.get("type", "object") for kind in feedback_body["schema"]["oneOf"]] == [
        "object", "array"]


def test_predict_answers_like_the_bundle_offline(client, built_bundle):
    bundle_dir, meta = built_bundle
    texts = ["great superb film", "awful dull boring plot", "the cast, the story"]
    response = client.post("/predict", json={"texts": texts})
    assert response.status_code == 200
    body = response.json()
    assert body["model_version"] == meta["version"]
    expected = Bundle.load(bundle_dir, "int8").predict_proba(texts)
    for prediction, probs in zip(body["predictions"], expected, strict=True):
        assert set(prediction["probabilities"]) == {"neg", "pos"}
        served = np.array([prediction["probabilities"]["neg"], prediction["probabilities"]["pos"]])
        # the service may batch these texts otherwise than predict_proba does
        assert np.abs(served - probs).max() <= batch_tolerances(compose())["int8"]
        assert prediction["label"] == ["neg", "pos"][int(served.argmax())]
        assert prediction["score"] == pytest.approx(served.max(), abs=1e-6)
    assert body["predictions"][0]["label"] == "pos" and body["predictions"][1]["label"] == "neg"


BAD_REQUESTS = [
    # (body or raw bytes, status, code, words in the message, extra fields)
    ({"texts": ["a"] * 9}, 422, "too_many_texts", "at most 8", {"limit": "max_texts"}),
    ({"texts": ["ok", "x" * 201]}, 422, "text_too_long", "texts[1] has 201 characters",
     {"limit": "max_chars", "item": 1}),
    ({"texts": ["ok", ""]}, 422, "empty_text", "texts[1] is empty", {"item": 1}),
    ({"texts": ["ok", "   "]}, 422, "empty_text", "texts[1] is empty", {"item": 1}),
    ({"texts": []}, 422, "no_texts", "at least one", {}),
    ({"texts": ["ok", 3]}, 422, "invalid_request", "texts.1", {"item": 1}),
    ({"texts": "not a list"}, 422, "invalid_request", "texts", {}),
    ({"text": ["typo in the field"]}, 422, "invalid_request", "", {}),
    ({"texts": ["ok"], "extra": 1}, 422, "invalid_request", "extra", {}),
    (b'{"texts": ["unterminated', 400, "invalid_json", "not valid JSON", {}),
    (b"", 422, "invalid_request", "body: Field required", {"field": "body"}),
    ({"texts": ["y" * 150] * 30}, 413, "body_too_large", "over 4000 bytes",
     {"limit": "max_body_bytes"}),
]


@pytest.mark.parametrize("body,status,code,words,extra", BAD_REQUESTS,
                         ids=[r[2] + str(i) for i, r in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_clear_errors(client, body, status, code, words, extra):
    if isinstance(body, bytes):
        response = client.post("/predict", content=body,
                               headers={"Content-Type": "application/json"})
    else:
        response = client.post("/predict", json=body)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["code"] == code
    assert words in error["error"]
    for key, value in extra.items():
        assert error[key] == value


def test_body_limit_holds_for_chunked_uploads(client):
    """No Content-Length: the limit is enforced while the body streams in."""
    def chunks():
        for _ in range(10):
            yield b" " * 1000
    response = client.post("/predict", content=chunks(),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["code"] == "body_too_large"


def test_a_broken_bundle_is_never_ready(tmp_path):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "bundle.json").write_text("{not json")
    service = control.start(tmp_path / "bundle", control.free_port(), tmp_path / "log")
    try:
        control.wait_until(f"{service.url}/health/live", 20, service.process)
        with httpx.Client(base_url=service.url, timeout=10) as c:
            ready = c.get("/health/ready")
            assert ready.status_code == 503
            assert ready.json()["status"] == "failed"
            assert "bundle.json: not valid JSON" in ready.json()["error"]
            response = c.post("/predict", json={"texts": ["hello"]})
            assert response.status_code == 503 and response.json()["code"] == "not_ready"
    finally:
        control.stop(service.process)
