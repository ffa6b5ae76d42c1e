"""Serving under production conditions: batching, backpressure, timeouts, draining,
zero-downtime reload, security, the Open Inference Protocol, metrics and explanations."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import (
    answers,
    compose,
    eventually,
    every_worker_serves,
    running_service,
    send_without_reading,
)
from prometheus_client.parser import text_string_to_metric_families

from pipeline.tasks.parity import batch_tolerances
from serving.bundle import Bundle
from serving.engine.batcher import Batcher
from serving.engine.inference import infer, length_groups

TEXTS = ["great superb film", "awful dull boring plot", "the cast, the story and the acting",
         "lovely", "weak weak weak film with a boring cast " * 3, "fine movie", "bad",
         "superb acting and a great story but a dull plot"]
# A text scored alone vs inside a batch may differ by the deploy stage's bounds: int8
# can cross one rounding step where the fp32 ops between its layers round differently.
TOLERANCE = batch_tolerances(compose())


def copy_bundle(src, dest, version: str):
    """The same model under another version: a 'new' bundle for reload tests."""
    shutil.copytree(src, dest)
    meta = json.loads((dest / "bundle.json").read_text())
    meta["version"] = version
    (dest / "bundle.json").write_text(json.dumps(meta))
    return dest


# ---------------------------------------------------------------- batching


def test_length_groups_bound_the_padding():
    lengths = [3, 60, 4, 58, 5, 3, 61, 30]
    groups = length_groups(lengths, max_padding=1.25)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        real = sum(lengths[i] for i in group)
        assert max(lengths[i] for i in group) * len(group) <= 1.25 * real
    assert len(groups) < len(lengths)  # similar lengths do share a call


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_batched_answers_equal_single_answers(built_bundle, precision):
    bundle = Bundle.load(built_bundle[0], precision)
    single = np.concatenate([infer(bundle, [t])[0] for t in TEXTS])
    batched, stats = infer(bundle, TEXTS)
    assert np.abs(single - batched).max() <= TOLERANCE[precision]
    # no text is a near-tie within the tolerance, so every label must be identical
    top_two = np.sort(single, axis=1)[:, -2:]
    assert (top_two[:, 1] - top_two[:, 0] > 2 * TOLERANCE[precision]).all()
    assert (single.argmax(1) == batched.argmax(1)).all()
    assert stats.padded_tokens <= 1.25 * stats.real_tokens


def test_batcher_merges_concurrent_requests(built_bundle):
    bundle = Bundle.load(built_bundle[0], "int8")
    seen = []
    batcher = Batcher(lambda: bundle, max_batch_size=64, max_wait_ms=20, on_batch=seen.append)
    # one to three texts per request: each gets its own rows back
    requests = [TEXTS[i % 6:i % 6 + 1 + i % 3] for i in range(32)]

    async def many():
        return await asyncio.gather(*(batcher.submit(texts) for texts in requests))

    try:
        results = asyncio.run(many())
    finally:
        batcher.close()
    expected = np.concatenate([infer(bundle, [t])[0] for texts in requests for t in texts])
    merged = np.concatenate([probs for probs, _, _ in results])
    assert np.abs(merged - expected).max() <= TOLERANCE["int8"]
    assert all(used is bundle for _, used, _ in results)
    # each request's own token ids, which a shadow challenger may score as they are
    assert [encoded for *_, encoded in results] == [bundle.encode(texts) for texts in requests]
    assert sum(s.texts for s in seen) == sum(len(texts) for texts in requests)
    assert max(s.requests for s in seen) > 1  # requests did share model calls


# ---------------------------------------------------------------- backpressure


def test_full_queue_answers_503_with_retry_after_and_drops_nothing(built_bundle, tmp_path):
    long_texts = [TEXTS[4] * 2] * 8
    with running_service(built_bundle[0], tmp_path, max_queue=16, max_texts=8,
                         max_batch_size=8, max_wait_ms=0) as service:
        results = answers([send_without_reading(service.url, "/predict", {"texts": long_texts})
                           for _ in range(64)])
    assert {status for status, _, _ in results} <= {200, 503}, results
    refused = [(headers, body) for status, headers, body in results if status == 503]
    assert refused, "the queue never filled"
    assert refused[0][0]["Retry-After"] == "1"
    assert refused[0][1]["code"] == "overloaded"
    accepted = [body for status, _, body in results if status == 200]
    assert accepted and all(len(body["predictions"]) == 8 for body in accepted)


def test_slow_answer_times_out_with_504(built_bundle, tmp_path):
    with running_service(built_bundle[0], tmp_path, request_timeout_s=0.0005) as service:
        response = httpx.post(f"{service.url}/predict", json={"texts": TEXTS * 8}, timeout=30)
    assert response.status_code == 504
    assert response.json()["code"] == "timeout"


def queued_texts(url: str) -> float:
    return queue_and_answered(url)[0]


def queue_and_answered(url: str) -> tuple[float, float]:
    """(texts waiting for the model, /predict requests answered 200), one scrape."""
    lines = httpx.get(f"{url}/metrics", timeout=5).text.splitlines()

    def value(prefix: str) -> float:
        return next((float(line.split()[-1]) for line in lines if line.startswith(prefix)),
                    0.0)

    return (value("textops_queue_depth"),
            value('textops_requests_total{method="POST",route="/predict",status="200"}'))


# One process, as `uvicorn --factory serving.api.app:create_app` or TEXTOPS_WORKERS=1 runs
# it, and two, as `python -m serving` does on 2 cores.
WORKERS = pytest.mark.parametrize("workers", [1, 2])


@WORKERS
def test_sigterm_finishes_requests_in_flight(built_bundle, tmp_path, workers):
    """SIGTERM: stop accepting, answer every request already accepted, then exit."""
    # Texts of the full max_length, one request per model call: the requests keep the
    # model busy for about half a second here, far longer than they take to arrive.
    texts, requests = [TEXTS[4] * 3] * 64, 48
    with running_service(built_bundle[0], tmp_path, workers=workers, max_batch_size=8,
                         max_texts=64,
                         max_queue=4096) as service:
        connections = [send_without_reading(service.url, "/predict", {"texts": texts})
                       for _ in range(requests)]
        # Signal once all were accepted and some still wait: queued + answered
        # covers all but the one request each worker's inference thread holds. One
        # scrape per look: by a second one the queue may have drained.
        deadline, waiting, answered = time.monotonic() + 10, 0.0, 0.0
        while not (waiting and waiting / 64 + answered >= requests - workers) \
                and time.monotonic() < deadline:
            waiting, answered = queue_and_answered(service.url)
        assert waiting > 0  # accepted and waiting for the model
        service.process.send_signal(signal.SIGTERM)
        results = answers(connections)
        service.process.wait(30)
        log = service.log_tail(20)
    assert [status for status, _, _ in results] == [200] * requests
    assert all(len(body["predictions"]) == 64 for _, _, body in results)
    assert "Application shutdown complete" in log and "Finished server process" in log


# ---------------------------------------------------------------- reload


@WORKERS
def test_reload_under_load_fails_no_request(built_bundle, tmp_path, workers):
    old = copy_bundle(built_bundle[0], tmp_path / "bundles" / "1", "v-old")
    new = copy_bundle(built_bundle[0], tmp_path / "bundles" / "2", "v-new")
    current = tmp_path / "current"
    current.symlink_to(old)
    with running_service(current, tmp_path, watch_interval_s=0.2, workers=workers) as service:
        stop, statuses, versions = threading.Event(), [], []

        def load():
            with httpx.Client(base_url=service.url, timeout=30) as client:
                while not stop.is_set():
                    r = client.post("/predict", json={"texts": TEXTS})
                    statuses.append(r.status_code)
                    versions.append(r.json().get("model_version"))

        workers = [threading.Thread(target=load) for _ in range(8)]
        for w in workers:
            w.start()
        time.sleep(1)
        link = tmp_path / "current.tmp"
        link.symlink_to(new)
        os.replace(link, current)  # what the deploy stage does
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "v-new" not in versions[-8:]:
            time.sleep(0.1)
        every_worker_serves(service.url, 20, model_version="v-new")
        time.sleep(0.5)
        stop.set()
        for w in workers:
            w.join()
        metrics = httpx.get(f"{service.url}/metrics").text
    assert statuses and set(statuses) == {200}
    assert "v-old" in versions and versions[-1] == "v-new"
    served = {tuple(sorted(sample.labels.items())) for family
              in text_string_to_metric_families(metrics) for sample in family.samples
              if sample.name == "textops_model_info" and sample.value == 1}
    assert (("model_name", "synthetic-classifier"), ("precision", "int8"),
            ("task", "text_classification"), ("version", "v-new")) in served


@WORKERS
def test_admin_reload_token_and_broken_bundle_refused(built_bundle, tmp_path, workers):
    other = copy_bundle(built_bundle[0], tmp_path / "other", "v-other")
    broken = copy_bundle(built_bundle[0], tmp_path / "broken", "v-broken")
    (broken / "model.int8.onnx").write_bytes(b"not an onnx model")
    with running_service(built_bundle[0], tmp_path, admin_token="s3cret", workers=workers,
                         watch_interval_s=0) as service:
        url = f"{service.url}/admin/reload"
        assert httpx.post(url).status_code == 401
        assert httpx.post(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        refused = httpx.post(url, headers=auth, json={"bundle": str(broken)}, timeout=30)
        assert refused.status_code == 422
        assert "model.int8.onnx: onnxruntime cannot load it" in refused.json()["error"]
        missing = httpx.post(url, headers=auth, json={"bundle": str(tmp_path / "nope")})
        assert missing.status_code == 422 and "no such bundle directory" in missing.text
        # the old model kept serving through both
        assert httpx.get(f"{service.url}/health/ready").json()["model_version"] \
            == built_bundle[1]["version"]
        done = httpx.post(url, headers=auth, json={"bundle": str(other)}, timeout=30)
        assert done.status_code == 200
        answer = done.json()
        assert (answer["model_version"], answer["previous_version"]) == \
            ("v-other", built_bundle[1]["version"])
        # every server process serves it before the answer
        assert {w["model_version"] for w in answer["workers"]} == {"v-other"}
        assert httpx.get(f"{service.url}/metadata").json()["version"] == "v-other", \
            service.log_tail()  # a worker restarted with the old bundle would say so
    with running_service(built_bundle[0], tmp_path) as service:  # no token: no admin API
        assert httpx.post(f"{service.url}/admin/reload").status_code == 404


def test_api_keys_guard_prediction_routes_only(built_bundle, tmp_path):
    with running_service(built_bundle[0], tmp_path, api_keys="k1,k2",
                         prediction_log=f"sqlite:///{tmp_path}/log.db") as service:
        with httpx.Client(base_url=service.url) as c:
            body = {"texts": ["great"]}
            assert c.post("/predict", json=body).status_code == 401
            assert c.post("/predict", json=body, headers={"X-API-Key": "nope"}).status_code \
                == 401
            assert c.post("/predict", json=body, headers={"X-API-Key": "k2"}).status_code == 200
            assert c.post("/predict", json=body,
                          headers={"Authorization": "Bearer k1"}).status_code == 200
            assert c.post("/explain", json={"text": "great"}).status_code == 401
            # feedback is guarded like the predictions it labels
            answered = c.post("/predict", json=body, headers={"X-API-Key": "k1"}).json()
            feedback = {"request_id": answered["request_id"], "label": "pos"}
            assert c.post("/feedback", json=feedback).status_code == 401
            assert c.post("/feedback", json=feedback,
                          headers={"X-API-Key": "k2"}).json() == {"accepted": 1}
            assert c.get("/health/ready").status_code == 200  # probes need no key
            assert c.get("/metadata").status_code == 200


# ---------------------------------------------------------------- interfaces


def test_open_inference_protocol_with_tritonclient(live_service, built_bundle):
    import tritonclient.http as triton

    name = built_bundle[1]["model_name"]
    client = triton.InferenceServerClient(live_service.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(name)
    metadata = client.get_model_metadata(name)
    assert metadata["inputs"][0] == {"name": "text", "datatype": "BYTES", "shape": [-1]}
    texts = ["great superb film", "awful dull boring plot"]
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object), binary_data=False)
    result = client.infer(name, [tensor], outputs=[
        triton.InferRequestedOutput("probabilities", binary_data=False),
        triton.InferRequestedOutput("label", binary_data=False)])
    probs = result.as_numpy("probabilities")
    expected = Bundle.load(built_bundle[0], "int8").predict_proba(texts)
    assert probs.shape == (2, 2) and np.abs(probs - expected).max() <= TOLERANCE["int8"]
    assert [label.decode() if isinstance(label, bytes) else label
            for label in result.as_numpy("label")] == ["pos", "neg"]
    with pytest.raises(triton.InferenceServerException, match="unknown model 'nope'"):
        client.infer("nope", [tensor])
    bad = httpx.post(f"{live_service.url}/v2/models/{name}/infer",
                     json={"inputs": [{"name": "text", "shape": [1], "datatype": "FP32",
                                       "data": [1.0]}]})
    assert bad.status_code == 400 and bad.json() == {"error": "input 'text' must be BYTES, "
                                                              "not FP32"}


def scrape_samples(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of one /metrics scrape, by (sample name, sorted label pairs)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_expose_traffic_batches_and_drift(live_service, built_bundle):
    """What this test's traffic adds, exactly (every series below exists, at 0, from
    the start): one-text requests sent one after another are one model call each."""
    url, n = live_service.url, len(TEXTS)
    tokens = sum(len(ids) for ids in Bundle.load(built_bundle[0], "int8").encode(TEXTS))
    predict = (("method", "POST"), ("route", "/predict"))
    expected = {
        ("textops_requests_total", (*predict, ("status", "200"))): n,
        ("textops_requests_total", (*predict, ("status", "422"))): 1,
        ("textops_request_seconds_count", (("route", "/predict"),)): n + 1,
        ("textops_batch_texts_count", ()): n,
        ("textops_batch_texts_sum", ()): n,
        ("textops_batch_requests_count", ()): n,
        ("textops_batch_requests_sum", ()): n,
        ("textops_inference_seconds_count", ()): n,
        ("textops_tokens_total", (("kind", "real"),)): tokens,
        ("textops_tokens_total", (("kind", "padded"),)): tokens,  # one text a call: no padding
    }
    before = scrape_samples(url)
    with httpx.Client(base_url=url) as c:
        for text in TEXTS:
            assert c.post("/predict", json={"texts": [text]}).status_code == 200
        assert c.post("/predict", json={"texts": []}).status_code == 422

    def moved() -> dict:
        after = scrape_samples(url)
        return {key: after.get(key, 0.0) - before.get(key, 0.0) for key in expected}

    # counted just after each answer is sent (and each batch's answers are handed out)
    deadline = time.monotonic() + 10
    while (deltas := moved()) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert deltas == expected
    # the drift window holds these texts (other workers publish theirs every 0.2 s)
    window = ("textops_drift_window_texts", ())
    eventually(lambda: scrape_samples(url)[window] >= before[window] + n)
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for needle in (
        "textops_queue_depth", "textops_model_info{",
        "textops_drift_length_psi", "textops_drift_unknown_token_psi",
        "textops_unknown_token_rate", "textops_drift_predicted_class_psi",
        'textops_predicted_class_share{label="pos"}',
    ):
        assert needle in text, needle
    # the drift values themselves: tests/serving/test_serving_drift.py


def test_explain_attributes_the_label_to_its_tokens(live_service):
    response = httpx.post(f"{live_service.url}/explain",
                          json={"text": "superb film, awful plot"}, timeout=30)
    assert response.status_code == 200
    body = response.json()
    tokens = {t["token"]: t["attribution"] for t in body["tokens"]}
    assert {"superb", "film", "awful", "plot"} <= set(tokens)
    supporting = "superb" if body["label"] == "pos" else "awful"
    opposing = "awful" if body["label"] == "pos" else "superb"
    assert tokens[supporting] > 0 > tokens[opposing]
    first = body["tokens"][0]
    assert "superb film, awful plot"[first["start"]:first["end"]] == first["token"]


# ---------------------------------------------------------------- following the registry


def test_replica_follows_the_champion_alias_on_a_tracking_server(built_bundle, tmp_path):
    """A service started from models:/<name>@champion, against a real `mlflow server`,
    switches by itself when another version becomes champion."""
    import subprocess
    import sys

    import mlflow
    from conftest import inside

    from ops import control
    from pipeline.tracking import registry

    bundle_dir, meta = built_bundle
    db = f"sqlite:///{tmp_path}/mlflow.db"
    with inside(tmp_path):
        mlflow.set_tracking_uri(db)
        run = mlflow.MlflowClient().create_run(
            mlflow.MlflowClient().create_experiment("replicas")).info.run_id
        v1 = registry.register(bundle_dir, meta, run)
        mlflow.MlflowClient().set_registered_model_alias(meta["model_name"], "champion", v1)

    port = control.free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", db,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, stdout=open(tmp_path / "mlflow.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    tracking = f"http://127.0.0.1:{port}"
    try:
        control.wait_until(f"{tracking}/health", 60, server)
        os.environ["MLFLOW_TRACKING_URI"] = tracking  # the replica's environment
        with running_service(f"models:/{meta['model_name']}@champion", tmp_path,
                             watch_interval_s=0.5, cache_dir=tmp_path / "cache") as service:
            ready = httpx.get(f"{service.url}/health/ready").json()
            assert ready["model_version"] == meta["version"]
            assert httpx.get(f"{service.url}/metadata").json()["identity"] == \
                f"{meta['model_name']}/{v1}"

            second = copy_bundle(bundle_dir, tmp_path / "second", "v-second")
            with inside(tmp_path):
                mlflow.set_tracking_uri(db)
                newer = json.loads((second / "bundle.json").read_text())
                v2 = registry.register(second, newer, run)
                mlflow.MlflowClient().set_registered_model_alias(meta["model_name"],
                                                                 "champion", v2)
            every_worker_serves(service.url, 30, model_version="v-second",
                                identity=f"{meta['model_name']}/{v2}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def test_an_interrupted_registry_download_is_fetched_again_whole(tmp_path, built_bundle,
                                                                 monkeypatch):
    """A replica killed while downloading leaves `<version>.partial-<pid>` and perhaps a
    target without bundle.json; the next fetch clears both and yields a whole bundle
    (MLflow's download does not resume, so starting over is the only safe way on)."""
    import mlflow

    from serving.bundle import REGISTERED_BUNDLE
    from serving.engine.source import BundleSource

    bundle_dir, meta = built_bundle
    source = BundleSource("models:/sst2-classifier@champion", cache_dir=tmp_path / "cache")
    target = source.cache_dir / "sst2-classifier-3"
    stale = target.with_name(f"{target.name}.partial-{2**22 + 12345}")  # no such pid
    (stale / REGISTERED_BUNDLE).mkdir(parents=True)
    (stale / REGISTERED_BUNDLE / "model.onnx").write_bytes(b"half a file")
    target.mkdir(parents=True)
    (target / "model.onnx").write_bytes(b"half a file")  # no bundle.json: incomplete

    def download(artifact_uri, dst_path):
        assert artifact_uri == "models:/sst2-classifier/3"
        assert not stale.exists()  # the dead process's partial download was cleared
        shutil.copytree(bundle_dir, Path(dst_path) / REGISTERED_BUNDLE)
        return dst_path

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download)
    fetched = source.fetch("sst2-classifier/3")
    assert fetched == target and not stale.exists()
    assert json.loads((fetched / "bundle.json").read_text())["version"] == meta["version"]
    assert (fetched / "model.onnx").read_bytes() == (bundle_dir / "model.onnx").read_bytes()
