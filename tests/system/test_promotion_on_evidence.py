"""Promotion on evidence, end to end: a challenger in shadow on real traffic, labels
through /feedback, and the controller moving the registry without a person. A better
challenger is promoted while every concurrent request is answered; a worse one is
rolled back; the audit trail shows both with their evidence."""

from __future__ import annotations

import concurrent.futures
import shutil
import sys
import threading
from pathlib import Path

import httpx
import mlflow
import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
from conftest import eventually, metric_samples, post_json, running_service  # noqa: E402
from test_deploy import own_workspace, register_as  # noqa: E402,F401 - a fixture

from pipeline.config import Paths, compose  # noqa: E402
from pipeline.data.splits import column, load_splits  # noqa: E402
from pipeline.promotion.controller import check  # noqa: E402
from pipeline.stages import deploy  # noqa: E402
from pipeline.tracking import registry
from pipeline.tracking.challenger import CHALLENGER, set_challenger  # noqa: E402
from pipeline.tracking.lineage import training_run  # noqa: E402

PROMOTION = OmegaConf.to_container(compose([]).promotion)


@pytest.fixture
def two_models(own_workspace, built_bundle):  # noqa: F811 - the fixture imported above
    """The workspace's model, and the same model with its two classes swapped (wrong
    nearly always), each a bundle; and the labelled texts to send."""
    path, cfg = own_workspace
    paths = Paths(path)
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    run_id = training_run(cfg.mlflow.experiment, paths.checkpoint)  # before the swap
    checkpoint = torch.load(paths.checkpoint, map_location="cpu", weights_only=False)
    for key in ("model.classifier.weight", "model.classifier.bias"):
        checkpoint["state_dict"][key] = checkpoint["state_dict"][key].flip(0)
    torch.save(checkpoint, paths.checkpoint)
    swapped_meta = deploy.build_bundle(cfg, paths)
    swapped = Path(shutil.copytree(paths.candidate, path / "swapped"))
    good, good_meta = built_bundle
    test = load_splits(paths.processed)["test"]
    names = good_meta["label_names"]
    labelled = list(zip(column(test, "text"), [names[i] for i in column(test, "label")],
                        strict=True))
    v1 = register_as(swapped_meta, True, swapped, run_id)
    registry.promote(good_meta["model_name"], v1, swapped, paths)
    v2 = register_as(good_meta, True, good, run_id)
    return path, good_meta["model_name"], (v1, swapped), (v2, good), labelled * 3


def evidence(url: str, outcome: str, quantity: str) -> dict[tuple[str, str], float]:
    """One figure of the decisions the service shows in /metrics, by (champion,
    challenger)."""
    found = {}
    for key, value in metric_samples(url).items():
        name, _, labels = key.partition("{")
        if name == "textops_promotion_evidence":
            pairs = dict(pair.split("=", 1) for pair in labels.rstrip("}").split(","))
            pairs = {k: v.strip('"') for k, v in pairs.items()}
            if (pairs["outcome"], pairs["quantity"]) == (outcome, quantity):
                found[pairs["champion"], pairs["challenger"]] = value
    return found


def traffic(url: str, labelled: list[tuple[str, str]]) -> set[int]:
    """One text per request from 8 clients at once, each answer then labelled with the
    truth; the statuses of every request."""
    def one(item):
        text, truth = item
        answer = post_json(url, "/predict", {"texts": [text]})
        if answer.status_code != 200:
            return answer.status_code
        return post_json(url, "/feedback", {"request_id": answer.json()["request_id"],
                                            "label": truth}).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return set(pool.map(one, labelled))


class Steady:
    """Requests from 4 clients, one after another each, until stopped: the statuses of
    every answer while something else happens (a promotion, the service's switch)."""

    def __init__(self, url: str, texts: list[str]):
        self.url, self.texts = url, texts
        self.stop, self.statuses = threading.Event(), []
        self.pool = concurrent.futures.ThreadPoolExecutor(4)

    def __enter__(self) -> Steady:
        self.runs = [self.pool.submit(self.client, i) for i in range(4)]
        return self

    def client(self, start: int) -> None:
        i = start
        while not self.stop.is_set():
            text = self.texts[i % len(self.texts)]
            self.statuses.append(post_json(self.url, "/predict", {"texts": [text]})
                                 .status_code)
            i += 4

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for run in self.runs:
            run.result()
        self.pool.shutdown()


@pytest.mark.slow
def test_a_better_challenger_is_promoted_and_a_worse_one_rolled_back(two_models, tmp_path):
    path, name, (v1, swapped), (v2, good), labelled = two_models
    paths, log = Paths(path), f"sqlite:///{tmp_path / 'predictions.db'}"
    client = mlflow.MlflowClient()

    # the champion is the swapped model; the workspace's model challenges it
    set_challenger(name, v2, reason="test: the better model")
    with running_service(paths.current, tmp_path, challenger=good,
                         watch_interval_s=0.2) as service:
        assert traffic(service.url, labelled) == {200}
        eventually(lambda: metric_samples(service.url)[
            'textops_shadow_texts_total{outcome="scored"}'] == len(labelled))
        # users go on sending requests while the controller decides and the service
        # follows models/current to the promoted model: every one is answered
        with Steady(service.url, [text for text, _ in labelled]) as steady:
            decision = check(name, PROMOTION, log, paths)
            assert decision["outcome"] == "promote" and decision["acted"], decision
            assert decision["b"] > 0.8 * len(labelled) and decision["lower"] > 0
            assert str(client.get_model_version_by_alias(name, "champion").version) == v2
            good_version = client.get_model_version(name, v2).tags["bundle_version"]
            eventually(lambda: httpx.get(f"{service.url}/metadata", timeout=5)
                       .json()["version"] == good_version, timeout=30)
            answered = len(steady.statuses)
            eventually(lambda: len(steady.statuses) > answered + 20)  # after the switch
        assert set(steady.statuses) == {200}, sorted(set(steady.statuses))
        # and shows the decision that promoted it (read from the registry)
        assert eventually(lambda: evidence(service.url, "promote", "b"), timeout=30) \
            == {(v1, v2): decision["b"]}

    # now the swapped model challenges the promoted one, and loses
    set_challenger(name, v1, reason="test: the worse model")
    with running_service(paths.current, tmp_path, challenger=swapped) as service:
        assert traffic(service.url, labelled) == {200}
        eventually(lambda: metric_samples(service.url)[
            'textops_shadow_texts_total{outcome="scored"}'] == len(labelled))
        decision = check(name, PROMOTION, log, paths)
    assert decision["outcome"] == "rollback" and decision["acted"], decision
    assert decision["upper"] < 0
    assert str(client.get_model_version_by_alias(name, "champion").version) == v2
    assert registry.alias_version(client, name, CHALLENGER) is None

    # the history: both decisions, with their evidence
    decided = [m for m in registry.moves(name) if m["kind"] == "decision"]
    assert [(m["alias"], m["from_version"], m["to_version"], m["evidence"]["outcome"])
            for m in decided] == [("challenger", v1, None, "rollback"),
                                  ("challenger", v2, None, "promote"),
                                  ("champion", v1, v2, "promote")]
