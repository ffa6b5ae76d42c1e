"""Limits as a client meets them: V2's input limits, /explain under load, batching
turned off, and settings the service refuses to start with."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import ROOT, answers, running_service, send_without_reading

from serving.bundle import Bundle
from serving.settings import Settings, SettingsError

# ---------------------------------------------------------------- V2 limits
# live_service runs with max_texts=8 and max_chars=200 (tests/conftest.py).


def v2_infer(url: str, name: str, texts: list) -> httpx.Response:
    tensor = {"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}
    return httpx.post(f"{url}/v2/models/{name}/infer", json={"inputs": [tensor]}, timeout=30)


@pytest.mark.parametrize("texts,words", [
    (["ok"] * 9, "9 texts; at most 8"),
    (["ok", "x" * 201], "element 1 has 201 characters; at most 200"),
    (["ok", "  "], "element 1 is empty"),
    (["ok", 3], "element 1 is not a string"),
    ([], "at least one text"),
], ids=["max_texts", "max_chars", "empty", "not_a_string", "none"])
def test_v2_infer_holds_the_input_limits(live_service, built_bundle, texts, words):
    response = v2_infer(live_service.url, built_bundle[1]["model_name"], texts)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]
    assert set(response.json()) == {"error"}  # the protocol's error shape


def test_v2_infer_takes_texts_at_the_limits(live_service, built_bundle):
    texts = ["great superb film " + "x" * 182] * 8  # 8 texts of 200 characters
    response = v2_infer(live_service.url, built_bundle[1]["model_name"], texts)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][1]["shape"] == [8]


# ---------------------------------------------------------------- /explain under load

LONG = "superb film, awful plot, a great cast and a dull boring story " * 3


def test_explain_times_out_like_a_prediction(built_bundle, tmp_path):
    with running_service(built_bundle[0], tmp_path, request_timeout_s=0.0005) as service:
        response = httpx.post(f"{service.url}/explain", json={"text": LONG}, timeout=30)
        metrics = httpx.get(f"{service.url}/metrics").text
    assert response.status_code == 504, response.text
    assert response.json()["code"] == "timeout"
    assert 'textops_rejected_total{reason="timeout"} 1.0' in metrics


def test_explain_is_refused_when_the_queue_is_full(built_bundle, tmp_path):
    with running_service(built_bundle[0], tmp_path, max_queue=1, max_texts=1,
                         max_wait_ms=0) as service:
        results = answers([send_without_reading(service.url, "/explain", {"text": LONG})
                           for _ in range(32)])
    statuses = {status for status, _, _ in results}
    assert statuses <= {200, 503}, statuses
    refused = [(headers, body) for status, headers, body in results if status == 503]
    assert refused, "the queue bound never applied to /explain"
    assert refused[0][0]["Retry-After"] == "1"
    assert refused[0][1]["code"] == "overloaded"
    answered = [body for status, _, body in results if status == 200]
    assert answered and all(body["tokens"] for body in answered)


# ---------------------------------------------------------------- batching off


def histogram(metrics: str, name: str) -> tuple[float, float]:
    """(count, sum) of a Prometheus histogram in a /metrics text."""
    lines = dict(line.rsplit(" ", 1) for line in metrics.splitlines()
                 if line.startswith(name + "_count") or line.startswith(name + "_sum"))
    return float(lines[name + "_count"]), float(lines[name + "_sum"])


def test_batching_off_runs_every_request_alone(built_bundle, tmp_path):
    """TEXTOPS_BATCHING=false: concurrent requests never share a model call (with it
    on, a 50 ms wait for companions would merge them), and answers are unchanged."""
    texts = ["great superb film", "awful dull boring plot"] * 12
    with running_service(built_bundle[0], tmp_path, batching="false",
                         max_wait_ms=50) as service, \
            httpx.Client(base_url=service.url, timeout=60) as client, \
            ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda t: client.post("/predict", json={"texts": [t]}),
                                  texts))
        metrics = client.get("/metrics").text
    assert [r.status_code for r in responses] == [200] * len(texts)
    expected = Bundle.load(built_bundle[0], "int8").predict_proba(texts[:2]).argmax(1)
    labels = [r.json()["predictions"][0]["label"] for r in responses]
    assert labels == [["neg", "pos"][i] for i in expected] * 12
    calls, requests = histogram(metrics, "textops_batch_requests")
    assert calls == len(texts) and requests == len(texts)  # one request per model call


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("env,words", [
    ({"TEXTOPS_MAX_QUEUE": "lots"}, "TEXTOPS_MAX_QUEUE='lots': Input should be a valid "
                                    "integer"),
    ({"TEXTOPS_PRECISION": "int4"}, "TEXTOPS_PRECISION='int4': String should match"),
    ({"TEXTOPS_REQUEST_TIMEOUT_S": "0"}, "TEXTOPS_REQUEST_TIMEOUT_S='0': Input should be "
                                         "greater than 0"),
    ({"TEXTOPS_BATCHING": "maybe"}, "TEXTOPS_BATCHING='maybe': Input should be a valid "
                                    "boolean"),
    ({"TEXTOPS_MAX_TEXTS": "64", "TEXTOPS_MAX_QUEUE": "16"},
     "TEXTOPS_MAX_TEXTS (64) must not exceed TEXTOPS_MAX_QUEUE (16)"),
], ids=["not_a_number", "not_a_choice", "out_of_range", "not_a_boolean", "inconsistent"])
def test_bad_settings_name_the_variable_and_the_value(monkeypatch, env, words):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError) as caught:
        Settings.from_env()
    assert words in str(caught.value)


def test_the_service_refuses_to_start_with_bad_settings(tmp_path):
    env = {**os.environ, "TEXTOPS_MAX_QUEUE": "lots", "TEXTOPS_PRECISION": "int4",
           "TEXTOPS_BUNDLE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "serving"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr  # a message for people, not a stack
    assert "TEXTOPS_MAX_QUEUE='lots'" in result.stderr
    assert "TEXTOPS_PRECISION='int4'" in result.stderr
