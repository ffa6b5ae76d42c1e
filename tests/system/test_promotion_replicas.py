"""Promotion on evidence in the team setup: two replicas of the service, each with the
challenger in shadow, share one PostgreSQL prediction log. Clients are answered by one
replica and send their labels to the other; the controller decides on the shared log,
and both replicas follow the promotion and show the decision in /metrics."""

from __future__ import annotations

import concurrent.futures
import sys
import time
from pathlib import Path

import httpx
import mlflow
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import eventually, metric_samples, post_json, running_service  # noqa: E402
from test_deploy import own_workspace  # noqa: E402,F401 - a fixture
from test_promotion_on_evidence import (  # noqa: E402,F401 - a fixture
    PROMOTION,
    evidence,
    two_models,
)

from pipeline.config import Paths  # noqa: E402
from pipeline.promotion.controller import check  # noqa: E402
from pipeline.tracking.challenger import set_challenger  # noqa: E402
from serving.predlog.store import open_store  # noqa: E402


def label_elsewhere(answering: str, labelling: str, text: str, truth: str) -> int:
    """Ask one replica, label the answer at the other; a label that arrives before the
    answering replica has written its answer is refused with 503 and Retry-After, and
    sent again as a client should. The last status."""
    answer = post_json(answering, "/predict", {"texts": [text]})
    if answer.status_code != 200:
        return answer.status_code
    for _ in range(20):
        labelled = post_json(labelling, "/feedback", {"request_id": answer.json()["request_id"],
                                                      "label": truth})
        if labelled.status_code != 503:
            return labelled.status_code
        time.sleep(float(labelled.headers.get("Retry-After", "1")))
    return labelled.status_code


def shadow_rows(url: str) -> int:
    store = open_store(url)
    try:
        return store.count("shadow_predictions")
    finally:
        store.close()


def scored(url: str) -> float:
    return metric_samples(url)['textops_shadow_texts_total{outcome="scored"}']


@pytest.mark.slow
def test_replicas_on_one_postgresql_log_promote_together(two_models, postgres,  # noqa: F811
                                                          tmp_path):
    path, name, (v1, _), (v2, good), labelled = two_models
    paths = Paths(path)
    store = open_store(postgres.url)  # the module's server, emptied for this test
    with store.connection:
        store.connection.cursor().execute("DELETE FROM feedback; DELETE FROM predictions; "
                                          "DELETE FROM shadow_predictions")
    store.close()
    client = mlflow.MlflowClient()
    set_challenger(name, v2, reason="test: the better model, on two replicas")
    replica = {"workers": 1, "challenger": good, "watch_interval_s": 0.2,
               "prediction_log": postgres.url}
    with running_service(paths.current, tmp_path / "a", **replica) as a, \
            running_service(paths.current, tmp_path / "b", **replica) as b:
        urls = [(a.url, b.url), (b.url, a.url)]
        jobs = [(*urls[i % 2], text, truth) for i, (text, truth) in enumerate(labelled)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert set(pool.map(lambda job: label_elsewhere(*job), jobs)) == {200}
        # each replica scored what it answered, into the one log
        eventually(lambda: scored(a.url) + scored(b.url) == len(labelled))
        assert scored(a.url) == scored(b.url) == len(labelled) / 2
        eventually(lambda: shadow_rows(postgres.url) == len(labelled))  # scored, then written
        decision = check(name, PROMOTION, postgres.url, paths)
        assert decision["outcome"] == "promote" and decision["acted"], decision
        assert decision["n"] == len(labelled)  # every label paired, whoever stored it
        good_version = client.get_model_version(name, v2).tags["bundle_version"]
        for service in (a, b):  # both follow, and both show the evidence
            eventually(lambda url=service.url: httpx.get(f"{url}/metadata", timeout=5)
                       .json()["version"] == good_version, timeout=30)
            eventually(lambda url=service.url: evidence(url, "promote", "n")
                       == {(v1, v2): len(labelled)}, timeout=30)

