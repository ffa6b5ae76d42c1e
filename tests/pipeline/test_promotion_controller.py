"""The promotion controller on a real registry and prediction log: a challenger better
on the paired labels is promoted, a worse one retired, too few labels move nothing;
every decision is recorded (MLflow, the version's tags and model card, what /metrics
shows) and every move is in the audit trail."""

from __future__ import annotations

import json
import os
import time

import mlflow
import pytest
from omegaconf import OmegaConf
from test_deploy import bundle, own_workspace, register_as  # noqa: F401 - fixtures

from pipeline.config import Paths, compose
from pipeline.promotion.controller import EXPERIMENT, check, paired_counts
from pipeline.tracking import registry
from pipeline.tracking.cards import HEADING, fitted, with_decision
from pipeline.tracking.challenger import CHALLENGER, set_challenger
from pipeline.tracking.lineage import training_run
from serving.monitoring.promotion import PromotionEvidence, latest_decision
from serving.predlog.store import open_store

PROMOTION = OmegaConf.to_container(compose([]).promotion)


def with_version(meta: dict, version: str) -> dict:
    return {**json.loads(json.dumps(meta)), "version": version}


def log_pairs(url: str, champion: str, challenger: str, outcomes: list[tuple[bool, bool]],
              start: int = 0) -> None:
    """Labelled requests both models answered: (champion right, challenger right)."""
    store = open_store(url)
    predictions, shadows, labels = [], [], []
    now = time.time()
    for n, (champion_right, challenger_right) in enumerate(outcomes, start):
        rid = f"req-{n}"
        at = now + n * 1e-4
        predictions.append((rid, 0, at, champion, "a text", f"sha{n}", "[0.6, 0.4]",
                            "pos" if champion_right else "neg"))
        shadows.append((rid, 0, at + 5e-5, challenger, "[0.3, 0.7]",
                        "pos" if challenger_right else "neg"))
        labels.append((rid, 0, "pos"))
    store.write_predictions(predictions)
    store.write_shadow(shadows)
    assert store.record_feedback(labels, created=1e6) == []
    store.close()


@pytest.fixture
def registered(own_workspace, bundle, log_url):  # noqa: F811 - the fixtures imported above
    """v1 the champion, v2 another blessed version (its own bundle version), and an
    empty log on SQLite or PostgreSQL (the team setup), as the services write it."""
    path, cfg = own_workspace
    paths = Paths(path)
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    bundle_dir, meta = path / "models/candidate", bundle[1]
    run_id = training_run(cfg.mlflow.experiment, paths.checkpoint)
    v1 = register_as(with_version(meta, "champ-1"), True, bundle_dir, run_id)
    registry.promote(meta["model_name"], v1, bundle_dir, paths)
    v2 = register_as(with_version(meta, "chall-2"), True, bundle_dir, run_id)
    return meta["model_name"], paths, log_url, v1, v2


def test_a_better_challenger_is_promoted_on_paired_labels(registered):
    name, paths, log, v1, v2 = registered
    set_challenger(name, v2, reason="retrained on feedback")
    # 40 requests only the challenger got right, 4 only the champion, 120 both
    log_pairs(log, "champ-1", "chall-2", [(False, True)] * 40 + [(True, False)] * 4
              + [(True, True)] * 120)
    assert paired_counts(log, "champ-1", "chall-2").b == 40
    result = check(name, PROMOTION, log, paths)
    assert result["outcome"] == "promote" and result["acted"]
    assert (result["n"], result["b"], result["c"]) == (164, 40, 4)
    assert result["lower"] > 0 and result["p_value"] < 0.05
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(name, "champion").version) == v2
    assert os.readlink(paths.current) == f"bundles/{v2}"
    assert registry.alias_version(client, name, CHALLENGER) is None
    tags = client.get_model_version(name, v2).tags
    assert tags["challenge_outcome"] == "promote"
    assert json.loads(tags["decision"])["b"] == 40
    # the audit trail: the challenge, the promotion with its evidence, the alias taken away
    moves = registry.moves(name)
    assert [(m["alias"], m["kind"], m["from_version"], m["to_version"]) for m in moves[:3]] \
        == [("challenger", "decision", v2, None), ("champion", "decision", v1, v2),
            ("challenger", "challenge", None, v2)]
    assert moves[1]["evidence"]["outcome"] == "promote"
    assert moves[1]["reason"].startswith("challenger better")
    decisions = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert decisions[0].data.metrics["b"] == 40
    # the registry's model card: the bundle's card, then the decision and its evidence
    card = client.get_model_version(name, v2).description
    assert card.startswith("# Model card: ")
    section = card[card.index(HEADING):]
    assert "**promote**" in section and f"against v{v1} (the champion)" in section
    assert "| 164 | +0.2195 |" in section and "only the challenger right on 40" in section
    # what a service with this registry shows in /metrics
    evidence = PromotionEvidence()
    evidence.refresh(name)
    samples = {tuple(s.labels.values()): s.value
               for family in evidence.collect() for s in family.samples}
    assert samples[(v1, v2, "shadow", "promote", "true", "b")] == 40
    assert samples[(v1, v2, "shadow", "promote", "true", "lower")] > 0


def test_a_worse_challenger_is_retired_and_few_labels_move_nothing(registered):
    name, paths, log, v1, v2 = registered
    set_challenger(name, v2)
    log_pairs(log, "champ-1", "chall-2", [(True, False)] * 10 + [(True, True)] * 20)
    waiting = check(name, PROMOTION, log, paths)  # 30 labels, under min_labels
    assert waiting["outcome"] == "continue" and not waiting["acted"]
    assert "of the 100 labels needed" in waiting["reason"]
    client = mlflow.MlflowClient()
    assert registry.alias_version(client, name, CHALLENGER) == v2
    log_pairs(log, "champ-1", "chall-2", [(True, False)] * 40 + [(True, True)] * 100,
              start=30)
    dry = check(name, PROMOTION, log, paths, act=False)
    assert dry["outcome"] == "rollback" and not dry["acted"]
    assert registry.alias_version(client, name, CHALLENGER) == v2
    # a dry run changes nothing a person or a service reads as the decision
    assert "**continue**" in client.get_model_version(name, v2).description
    assert latest_decision(name)["outcome"] == "continue"
    retired = check(name, PROMOTION, log, paths)
    assert retired["outcome"] == "rollback" and retired["acted"] and retired["upper"] < 0
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1
    assert registry.alias_version(client, name, CHALLENGER) is None
    assert client.get_model_version(name, v2).tags["challenge_outcome"] == "rollback"
    card = client.get_model_version(name, v2).description  # the latest decision alone
    assert card.count(HEADING) == 1 and "**rollback**" in card and "**continue**" not in card
    assert latest_decision(name)["outcome"] == "rollback"
    assert registry.moves(name)[0]["kind"] == "decision"
    nothing = check(name, PROMOTION, log, paths)
    assert nothing["outcome"] is None and "no challenger" in nothing["reason"]


def log_canary(url: str, answers: list[tuple[str, bool]]) -> None:
    """Labelled requests, each answered by one model: (its bundle version, right)."""
    store = open_store(url)
    now = time.time()
    store.write_predictions([(f"req-{n}", 0, now + n * 1e-4, version, "a text", f"sha{n}",
                              "[0.6, 0.4]", "pos" if right else "neg")
                             for n, (version, right) in enumerate(answers)])
    assert store.record_feedback([(f"req-{n}", 0, "pos") for n in range(len(answers))],
                                 created=1e6) == []
    store.close()


def test_in_canary_mode_each_models_own_answers_decide(registered):
    name, paths, log, v1, v2 = registered
    set_challenger(name, v2)
    # 600 labelled answers of the champion, 70% right; 300 of the challenger, 95% right
    log_canary(log, [("champ-1", n % 10 < 7) for n in range(600)]
               + [("chall-2", n % 20 != 0) for n in range(300)])
    canary = {**PROMOTION, "mode": "canary"}
    result = check(name, canary, log, paths)
    assert (result["champion_n"], result["champion_right"]) == (600, 420)
    assert (result["challenger_n"], result["challenger_right"]) == (300, 285)
    assert result["outcome"] == "promote" and result["acted"] and result["lower"] > 0
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(name, "champion").version) == v2


def test_a_log_from_before_canary_stops_holds_none(tmp_path):
    """A log no server of this version has opened has no canary_stops table: the
    controller reads that as no stop, not as an error."""
    import sqlite3

    from pipeline.promotion.controller import canary_stop

    with sqlite3.connect(tmp_path / "old.db") as db:
        db.execute("CREATE TABLE predictions (request_id TEXT)")
    assert canary_stop(f"sqlite:///{tmp_path}/old.db", "chall-2") is None


def test_a_canary_its_guards_stopped_is_rolled_back_whatever_its_labels(registered):
    """The service recorded that the canary's guards stopped it (CanaryStops): the
    challenger is retired with the guard's reason, though its labels favour it."""
    from serving.predlog.canary_stops import CanaryStops

    name, paths, log, v1, v2 = registered
    set_challenger(name, v2)
    log_canary(log, [("champ-1", n % 10 < 7) for n in range(600)]
               + [("chall-2", n % 20 != 0) for n in range(300)])
    canary = {**PROMOTION, "mode": "canary"}
    stops = CanaryStops(log)
    stops.record("chall-9", "champ-1", "failed 5 requests")  # another challenger's
    assert check(name, canary, log, paths, act=False)["outcome"] == "promote"
    stops.record("chall-2", "champ-1", "failed 5 requests (of its latest 7)")
    stops.record("chall-2", "champ-1", "a later trip")  # the first stop stands
    stops.close()
    result = check(name, canary, log, paths)
    assert result["outcome"] == "rollback" and result["acted"]
    assert result["reason"] == ("the service's guards stopped the canary: the challenger "
                                "failed 5 requests (of its latest 7)")
    assert result["lower"] > 0  # the labels' evidence is kept beside the guard's reason
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1
    assert registry.alias_version(client, name, CHALLENGER) is None
    assert client.get_model_version(name, v2).tags["challenge_outcome"] == "rollback"
    assert "guards stopped the canary" in client.get_model_version(name, v2).description


def test_a_stop_cleared_by_a_person_no_longer_rolls_the_canary_back(registered):
    """`textops clear-stop`: the stop leaves the log, the clearing is in the audit trail
    with the stop's reason, and the canary's labels decide again."""
    from pipeline.promotion.controller import canary_stop, clear_canary_stop
    from pipeline.tracking import audit
    from serving.predlog.canary_stops import CanaryStops
    from serving.predlog.store import PredictionLogError

    name, paths, log, v1, v2 = registered
    set_challenger(name, v2)
    log_canary(log, [("champ-1", n % 10 < 7) for n in range(600)]
               + [("chall-2", n % 20 != 0) for n in range(300)])
    with pytest.raises(registry.RegistryError, match=f"v{v2} .*has no canary stop"):
        clear_canary_stop(name, v2, log, "a person", "no stop yet")
    with pytest.raises(registry.RegistryError, match="has no version 99"):
        clear_canary_stop(name, "99", log, "a person", "no such version")
    if log.startswith("sqlite"):
        with pytest.raises(PredictionLogError, match="no prediction log there"):
            clear_canary_stop(name, v2, log + ".typo", "a person", "a wrong path")
    stops = CanaryStops(log)
    stops.record("chall-2", "champ-1", "p99 2.4x the champion's")
    stops.close()
    canary = {**PROMOTION, "mode": "canary"}
    assert check(name, canary, log, paths, act=False)["outcome"] == "rollback"

    assert clear_canary_stop(name, v2, log, "a person", "the node was draining") == \
        "p99 2.4x the champion's"
    assert canary_stop(log, "chall-2") is None
    assert check(name, canary, log, paths, act=False)["outcome"] == "promote"
    cleared = audit.moves(mlflow.MlflowClient(), name)[0]
    assert (cleared["alias"], cleared["from_version"], cleared["kind"], cleared["actor"],
            cleared["reason"], cleared["evidence"]) == (
        "canary-stop", v2, "cleared", "a person", "the node was draining",
        {"stop": "p99 2.4x the champion's"})
    with pytest.raises(registry.RegistryError, match="has no canary stop"):
        clear_canary_stop(name, v2, log, "a person", "twice")


def test_only_answers_made_during_this_challenge_are_evidence(registered):
    name, paths, log, v1, v2 = registered
    log_pairs(log, "champ-1", "chall-2", [(False, True)] * 30)  # an earlier challenge
    time.sleep(0.05)
    set_challenger(name, v2)
    log_pairs(log, "champ-1", "chall-2", [(False, True)] * 12, start=100)
    # a client reuses request id req-100 for a new text: the champion answers again,
    # the challenger's answer to it is lost; its old answer must not pair with the label
    store = open_store(log)
    store.write_predictions([("req-100", 0, time.time() + 1000, "champ-1", "new text",
                              "sha-new", "[0.6, 0.4]", "pos")])
    store.write_shadow([("req-100", 0, time.time() - 1, "chall-2", "[0.3, 0.7]", "neg")])
    assert store.record_feedback([("req-100", 0, "pos")], created=2e6) == []
    store.close()
    result = check(name, PROMOTION, log, paths, act=False)
    assert (result["n"], result["b"], result["c"]) == (11, 11, 0)


def test_a_long_card_fits_the_registry_with_its_decision_whole():
    """MLflow keeps a description in 5,000 characters (PostgreSQL enforces it): a card
    of many classes is cut short, its decision section never."""
    card = "# Model card: many classes\n\n" + "| class | recall |\n" * 400
    section = f"{HEADING}\nLatest decision: **promote**.\n"
    fitted_card = fitted(with_decision(card, section))
    assert len(fitted_card) <= 5000 and fitted_card.endswith(section)
    assert fitted_card.startswith("# Model card: many classes") and "Cut short" in fitted_card
    assert fitted(card[:3000]) == card[:3000]
