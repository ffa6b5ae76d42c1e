"""Shadow mode through real HTTP: a challenger scores every answered request off the
request path; the champion's answers are unchanged, both are logged under one
request id, and every shadowed text is counted as scored or dropped."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import sqlite3

import httpx
import pytest
from conftest import eventually, metric_samples, post_json, running_service


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
