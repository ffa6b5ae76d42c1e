"""Shadow mode through real HTTP: a challenger scores every answered request off the
request path; the champion's answers are unchanged, both are logged under one
request id, and every shadowed text is counted as scored or dropped. And the upkeep
of a shadow (serving/engine/challenger.py), on a stand-in for the service: one whose
worker died is stopped and named; one that cannot start is named; only the requests
the log keeps are shadowed.

The worker process itself: tests/serving/test_shadow_worker.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import signal
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from conftest import eventually, metric_samples, post_json, running_service

from serving.engine import challenger as challenging
from serving.engine.challenger import Challenging
from serving.engine.following import load_warm
from serving.monitoring.metrics import ServiceMetrics
from serving.predlog.rows import sampled
from serving.settings import Settings


@pytest.fixture(scope="module")
def challenger(built_bundle, tmp_path_factory):
    """The built bundle under another version: a challenger that answers as the
    champion does, which makes every comparison below exact."""
    bundle_dir, meta = built_bundle
    copy = shutil.copytree(bundle_dir, tmp_path_factory.mktemp("challenger") / "bundle")
    changed = {**meta, "version": "challenger-1"}
    (copy / "bundle.json").write_text(json.dumps(changed))
    return copy


@pytest.mark.parametrize("workers", [1, 2])
def test_the_challenger_answers_beside_the_champion_and_is_logged_with_it(
        built_bundle, challenger, tmp_path, workers):
    bundle_dir, meta = built_bundle
    texts = ["good good film", "bad bad film", "good bad", "plain words here"]
    with running_service(bundle_dir, tmp_path, challenger=challenger,
                         workers=workers) as service:
        metadata = httpx.get(f"{service.url}/metadata", timeout=10).json()
        assert metadata["challenger"]["version"] == "challenger-1"
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: post_json(service.url, "/predict",
                                                        {"texts": texts}), range(40)))
        assert {a.status_code for a in answers} == {200}
        # the champion answers: its version, its probabilities
        assert {a.json()["model_version"] for a in answers} == {meta["version"]}
        v2 = post_json(service.url, f"/v2/models/{meta['model_name']}/infer", {"inputs": [
            {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["good"]}]})
        assert v2.status_code == 200
        counted = eventually(lambda: (m := metric_samples(service.url)) and (
            m['textops_shadow_texts_total{outcome="scored"}']
            + m['textops_shadow_texts_total{outcome="dropped"}'] == 40 * 4 + 1) and m)
        scored = counted['textops_shadow_texts_total{outcome="scored"}']
        assert scored > 0
        # the same model under another name: it agrees on every text it scored
        assert counted['textops_shadow_texts_total{outcome="agreed"}'] == scored
        # and has the same tokenizer.json: /predict and V2 hand it the champion's ids
        assert counted["textops_shadow_champion_ids_total"] == scored
        rid = answers[0].json()["request_id"]
        assert post_json(service.url, "/feedback", {"request_id": rid, "position": 0,
                                                    "label": meta["label_names"][0]}
                         ).status_code == 200  # the log has caught up with the answers
    with sqlite3.connect(tmp_path / "predictions.db") as db:
        pairs = db.execute(
            "SELECT p.label, s.label, p.probabilities, s.probabilities FROM predictions p "
            "JOIN shadow_predictions s USING (request_id, position) "
            "WHERE s.model_version = 'challenger-1'").fetchall()
        versions = {v for (v,) in db.execute("SELECT model_version FROM predictions")}
    assert len(pairs) == scored
    assert versions == {meta["version"]}  # the challenger never answers in shadow mode
    for champion, shadow, champion_p, shadow_p in pairs:
        assert champion == shadow
        assert json.loads(shadow_p) == pytest.approx(json.loads(champion_p), abs=1e-6)


def test_a_challenger_that_cannot_stand_beside_the_champion_is_named_and_ignored(
        built_bundle, tmp_path):
    bundle_dir, meta = built_bundle
    with running_service(bundle_dir, tmp_path, challenger=tmp_path / "nothing") as service:
        metadata = httpx.get(f"{service.url}/metadata", timeout=10).json()
        assert "nothing" in metadata["challenger"]["error"]
        answer = post_json(service.url, "/predict", {"texts": ["fine"]})
        assert answer.status_code == 200  # the champion serves on


def descendants(pid: int) -> list[int]:
    children = [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                for child in (task / "children").read_text().split()]
    return children + [d for child in children for d in descendants(child)]


def shadow_worker_of(pid: int) -> int:
    """The shadow worker's pid, under the one server process of the service `pid`:
    the one process there at the lowest CPU priority (serving/engine/shadow_worker.py)."""
    def idle(process: int) -> bool:
        return (os.sched_getscheduler(process) == os.SCHED_IDLE
                or os.getpriority(os.PRIO_PROCESS, process) == 19)

    found = [process for process in descendants(pid) if idle(process)]
    assert len(found) == 1, found
    return found[0]


def test_a_shadow_whose_worker_died_is_stopped_and_named_in_metadata(
        built_bundle, challenger, tmp_path):
    bundle_dir, _ = built_bundle
    with running_service(bundle_dir, tmp_path, challenger=challenger, workers=1,
                         watch_interval_s=0.2) as service:
        assert post_json(service.url, "/predict", {"texts": ["good"]}).status_code == 200
        eventually(lambda: metric_samples(service.url)[
            'textops_shadow_texts_total{outcome="scored"}'] == 1)
        os.kill(shadow_worker_of(service.process.pid), signal.SIGKILL)
        error = eventually(lambda: httpx.get(f"{service.url}/metadata", timeout=10).json()[
            "challenger"].get("error"))
        assert "challenger-1" in error and "exited (code -9)" in error
        answer = post_json(service.url, "/predict", {"texts": ["good", "bad"]})
        assert answer.status_code == 200  # the champion serves on, alone
        assert httpx.get(f"{service.url}/metadata", timeout=10).json()["challenger"] == {
            "error": error}  # not restarted on the next ticks


class Service(Challenging):
    """What of `InferenceService` the challenger's upkeep uses."""

    def __init__(self, settings: Settings, champion, prediction_log=None):
        self.settings, self.bundle, self.workers = settings, champion, 1
        self.metrics = ServiceMetrics(drift_window=10)
        self.prediction_log = prediction_log
        self.init_challenger()


def test_a_dead_shadow_is_stopped_on_the_next_tick_and_restarted_when_its_spec_moves(
        built_bundle, challenger, tmp_path):
    link = tmp_path / "challenger"
    link.symlink_to(challenger)
    service = Service(Settings(challenger=str(link)), load_warm(built_bundle[0], Settings()))
    try:
        asyncio.run(service.refresh_challenger())
        shadow = service.shadow
        shadow.process.kill()
        eventually(lambda: shadow.dead)
        asyncio.run(service.refresh_challenger())
        assert service.shadow is None and not shadow.process.is_alive()
        assert "challenger-1" in service.shadow_error and "exited" in service.shadow_error
        asyncio.run(service.refresh_challenger())  # not loaded again on every tick
        assert service.shadow is None and "exited" in service.shadow_error
        second = shutil.copytree(challenger, tmp_path / "second")
        meta = json.loads((second / "bundle.json").read_text())
        (second / "bundle.json").write_text(json.dumps({**meta, "version": "challenger-2"}))
        link.unlink()
        link.symlink_to(second)
        asyncio.run(service.refresh_challenger())  # ... but a new one is
        assert service.shadow.version == "challenger-2" and service.shadow_error is None
    finally:
        asyncio.run(service.stop_challenger(None))


def test_a_shadow_that_cannot_start_is_named_and_the_service_goes_on(
        built_bundle, challenger, monkeypatch):
    def no_shm(*args):
        raise FileNotFoundError(2, "No such file or directory", "/dev/shm")

    monkeypatch.setattr(challenging, "Shadow", no_shm)
    service = Service(Settings(challenger=str(challenger)),
                      load_warm(built_bundle[0], Settings()))
    asyncio.run(service.refresh_challenger())
    assert service.shadow is None and "/dev/shm" in service.shadow_error


@pytest.mark.parametrize("sample", [0.3, None])
def test_only_the_requests_the_log_keeps_are_shadowed(sample):
    """Its answers to the others would not be logged; without a log, every request
    is (the agreement counters)."""
    offered = []
    predictions = (SimpleNamespace(sample=sample, url="sqlite:///never-opened.db")
                   if sample is not None else None)
    service = Service(Settings(), None, predictions)
    service.shadow = SimpleNamespace(offer=lambda request_id, *_, **__: offered.append(request_id))
    ids = [f"request-{i}" for i in range(200)]
    for request_id in ids:
        service.shadow_score(request_id, ["good"], np.array([[0.2, 0.8]]), None)
        service.shadow_next_words(request_id, ["good"], ["film"], 1)
    kept = [i for i in ids if sample is None or sampled(i, sample)]
    assert offered == [i for i in kept for _ in range(2)]
    assert 0 < len(kept) < len(ids) if sample else len(kept) == len(ids)
