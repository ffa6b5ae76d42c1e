"""make retrain: drift thresholds calibrated on the training profile, each trigger and
its reason, the feedback snapshot, and the decision record read off a real service and
its prediction log."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
import yaml
from conftest import ROOT, compose, every_worker_shows, running_service
from omegaconf import OmegaConf

from pipeline.config import Paths
from pipeline.data import feedback
from pipeline.data.profile import reference_histogram
from pipeline.loops import retrain
from pipeline.loops.triggers import (
    DRIFT_METRICS,
    Signals,
    accuracy_trigger,
    calibrate,
    decide,
    drift_triggers,
    new_labels_trigger,
    thresholds,
)
from serving.bundle.tensors import length_counts
from serving.monitoring.drift import psi
from serving.predlog.store import open_store

RNG_LENGTHS = np.random.default_rng(1).geometric(0.08, 20_000) + 2  # skewed, like text


def profile_of(lengths: np.ndarray, classes=(0.5, 0.5), unk_rate=0.01) -> dict:
    """The parts of a training profile that drift is measured against."""
    return {"reference": {"length": reference_histogram(lengths), "unk_rate": unk_rate,
                          "class_shares": list(classes)},
            "splits": {"train": {"tokens": {"mean": float(lengths.mean())}}}}


PROFILE = profile_of(RNG_LENGTHS)


@pytest.fixture
def cfg():
    return compose().retrain


# ---------------------------------------------------------------- calibration


def live_length_psi(rng, window: int) -> float:
    """The service's length PSI over a window of texts drawn from the reference split."""
    reference = PROFILE["reference"]["length"]
    counts = length_counts(rng.choice(RNG_LENGTHS, window), reference["edges"])
    return psi(counts, reference["shares"])


def test_each_task_calibrates_the_psis_its_service_reports():
    rng = np.random.default_rng(2)
    surprisal = reference_histogram(rng.gamma(4.0, 1.2, 5000))
    next_word = {"reference": {"length": reference_histogram(RNG_LENGTHS), "unk_rate": 0.05,
                               "mean_tokens": 9.0, "surprisal": surprisal},
                 "splits": {"train": {"tokens": 200_000}}}  # a count, not statistics
    image = {"reference": {"brightness": surprisal, "contrast": surprisal,
                           "class_shares": [0.1] * 10}}
    assert set(calibrate(next_word, 500, 0.99, 500)) == {"length", "unknown_token",
                                                         "surprisal"}
    assert set(calibrate(image, 500, 0.99, 500)) == {"brightness", "contrast",
                                                     "predicted_class"}
    # every one of them a real spread: larger for a smaller window
    small, large = calibrate(next_word, 100, 0.99, 500), calibrate(next_word, 5000, 0.99, 500)
    assert all(small[name] > large[name] > 0 for name in small)
    assert set(DRIFT_METRICS) >= set(small) | {"brightness", "contrast", "predicted_class"}


def test_a_bundle_without_a_drift_reference_fires_no_drift_trigger(cfg):
    """A next-word bundle from before drift references reports PSIs it has nothing
    to calibrate against: said, not fired, and no crash."""
    signals = Signals(drift_window=5000, psi={"length": 3.0},
                      profile={"splits": {"train": {"tokens": 1000}}})
    limits = thresholds(signals, cfg.drift)
    assert limits == {}
    (found,) = drift_triggers(signals, cfg, limits)
    assert not found["fired"] and "no reference to calibrate" in found["reason"]


@pytest.mark.parametrize("window", [100, 1000])
def test_calibrated_thresholds_rarely_fire_on_unchanged_data(window):
    limit = calibrate(PROFILE, window, quantile=0.99, samples=2000)["length"]
    rng = np.random.default_rng(7)
    unchanged = np.array([live_length_psi(rng, window) for _ in range(1000)])
    assert (unchanged > limit).mean() < 0.03  # about the 1% the quantile promises
    if window == 100:  # where a fixed 0.1 would raise false alarms all the time
        assert (unchanged > 0.1).mean() > 0.25
        assert limit > 0.1


def test_thresholds_shrink_with_the_window_but_not_below_min_psi(cfg):
    small = calibrate(PROFILE, 100, 0.99, 2000)
    large = calibrate(PROFILE, 5000, 0.99, 2000)
    assert all(large[name] < small[name] for name in small)
    limits = thresholds(Signals(drift_window=5000, profile=PROFILE), cfg.drift)
    assert limits["length"]["calibrated"] == pytest.approx(large["length"])
    assert limits["length"]["threshold"] == cfg.drift.min_psi == 0.1


# ---------------------------------------------------------------- each trigger


def fired(triggers: list[dict]) -> list[str]:
    return [t["trigger"] for t in triggers if t["fired"]]


def test_drift_counts_only_over_a_large_enough_window(cfg):
    signals = Signals(drift_window=999, profile=PROFILE, new_labels=0,
                      psi={"length": 3.0, "unknown_token": 1.0, "predicted_class": 1.0})
    triggers, _ = decide(signals, cfg, since=None)
    assert fired(triggers) == []
    assert triggers[0]["reason"] == ("the drift window holds 999 texts, fewer than 1000: "
                                     "its PSIs are not trusted yet")


def test_drift_over_its_threshold_fires_with_the_figures(cfg):
    signals = Signals(drift_window=2000, profile=PROFILE, new_labels=0,
                      psi={"length": 0.3, "unknown_token": 0.0001, "predicted_class": 0.05})
    triggers, limits = decide(signals, cfg, since=None)
    assert fired(triggers) == ["drift:length"]
    reason = triggers[0]["reason"]
    assert reason.startswith("length PSI 0.3000 over 0.1000 over 2000 texts (no-change 99% "
                             f"quantile {limits['length']['calibrated']:.4f}, floor 0.1)")
    # with small windows allowed, the calibrated threshold, not 0.1, decides
    cfg.drift.min_window = 100
    signals.drift_window, signals.psi = 100, {"length": 0.15}
    triggers, limits = decide(signals, cfg, since=None)
    assert limits["length"]["threshold"] > 0.15 and fired(triggers) == []


def test_live_accuracy_counts_once_it_rests_on_enough_labels(cfg):
    few = Signals(live_accuracy=0.5, live_labels=199, new_labels=0)
    assert accuracy_trigger(few, cfg) == {
        "trigger": "live_accuracy", "fired": False, "labels": 199,
        "reason": "live accuracy rests on 199 labels, fewer than 200"}
    low = Signals(live_accuracy=0.7, live_labels=300, new_labels=0)
    found = accuracy_trigger(low, cfg)
    assert found["fired"] and found["reason"] == ("live accuracy 0.7000 under the floor 0.8 "
                                                  "over 300 labels")
    good = Signals(live_accuracy=0.85, live_labels=300, new_labels=0)
    assert not accuracy_trigger(good, cfg)["fired"]


def test_new_labels_since_the_last_retraining_and_force(cfg):
    assert not new_labels_trigger(Signals(new_labels=499), cfg, None)["fired"]
    enough = new_labels_trigger(Signals(new_labels=500), cfg, 1.7e9)
    assert enough["fired"]
    assert enough["reason"] == ("500 labelled answers since the last retraining "
                                "(2023-11-14T22:13:20Z), at least 500")
    unread = new_labels_trigger(Signals(new_labels=None), cfg, None)
    assert not unread["fired"] and unread["reason"] == "the prediction log could not be read"
    triggers, _ = decide(Signals(new_labels=0), cfg, None, force=True)
    assert fired(triggers) == ["force"]


# ---------------------------------------------------------------- the snapshot


def labelled_log(url: str, items: list[tuple[str, str, str, float]]) -> None:
    """A prediction log holding (request id, text, label, time) as labelled answers."""
    store = open_store(url)
    try:
        store.write_predictions([(rid, 0, created, "v1", text, f"sha-{text}", "[0.5, 0.5]", "neg")
                                 for rid, text, _, created in items])
        for rid, _, label, created in items:
            assert store.record_feedback([(rid, 0, label)], created) == []
    finally:
        store.close()


def test_the_snapshot_accumulates_and_takes_the_latest_label(tmp_path):
    url = f"sqlite:///{tmp_path}/log.db"
    labelled_log(url, [("a", "tasty soup", "pos", 10.0), ("b", "stale bread", "neg", 11.0)])
    snapshot = tmp_path / "data/feedback/labelled.jsonl"
    first = feedback.export(url, snapshot)
    assert first == {"snapshot": str(snapshot), "rows": 2, "from_log": 2, "new": 2,
                     "labels_until": 11.0}
    # the log forgets "a" (retention) and relabels "b": the snapshot keeps the one and
    # takes the other's new label
    store = open_store(url)
    with store.connection:
        store.connection.execute("DELETE FROM predictions WHERE request_id = 'a'")
    store.record_feedback([("b", 0, "pos")], 12.0)
    store.close()
    again = feedback.export(url, snapshot)
    rows = [json.loads(line) for line in snapshot.read_text().splitlines()]
    assert again["rows"] == 2 and again["new"] == 0
    assert [(r["request_id"], r["label"], r["created"]) for r in rows] == [
        ("a", "pos", 10.0), ("b", "pos", 12.0)]


def test_export_names_a_missing_log(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("data: {feedback: {snapshot: fb.jsonl}}\n"
                                          "retrain: {prediction_log: 'sqlite:///none.db'}\n")
    with pytest.raises(SystemExit, match="none.db"):
        feedback.main(["export"])
    assert not (tmp_path / "fb.jsonl").exists()


# ---------------------------------------------------------------- against a real service


@pytest.fixture(scope="module")
def logged_service(built_bundle, tmp_path_factory):
    """The service with its prediction log on, 6 answers given and labelled."""
    bundle_dir, _ = built_bundle
    directory = tmp_path_factory.mktemp("retrain-service")
    url = f"sqlite:///{directory}/predictions.db"
    with running_service(bundle_dir, directory, prediction_log=url) as service:
        texts = ["good great film number1", "awful bad plot number2", "fine lovely cast",
                 "dull boring story", "superb acting", "weak movie"]
        answer = httpx.post(f"{service.url}/predict", json={"texts": texts}).json()
        labels = [{"request_id": answer["request_id"], "position": i, "label": label}
                  for i, label in enumerate(["pos", "neg", "pos", "neg", "pos", "neg"])]
        assert httpx.post(f"{service.url}/feedback", json=labels).json() == {"accepted": 6}
        every_worker_shows(service.url, "textops_live_labels", 6)
        yield service, url


def test_a_dry_run_reads_the_service_and_records_its_decision(logged_service, tmp_path):
    service, url = logged_service
    cfg = compose()
    cfg.retrain.new_labels.min = 5
    record = retrain.run(cfg, service.url, url, dry_run=True, paths=Paths(tmp_path))
    assert record == json.loads((tmp_path / "reports/retrain.json").read_text())
    assert record["decision"] == "retrain (dry run: nothing ran)"
    assert record["reasons"] == ["6 labelled answers ever, at least 5"]
    signals = record["signals"]
    assert signals["new_labels"] == 6 and signals["live_labels"] == 6
    # a text classifier's PSIs: no image or next-word figures
    assert signals["drift_window"] == 6
    assert set(signals["psi"]) == {"length", "unknown_token", "predicted_class"}
    assert record["triggers"][0]["reason"].startswith("the drift window holds 6 texts")
    assert record["last_retraining"] is None and not (tmp_path / "data").exists()


def test_a_failed_pipeline_is_recorded_and_its_labels_count_again(logged_service, tmp_path):
    service, url = logged_service
    cfg = compose()
    cfg.retrain.command = [sys.executable, "-c", "import sys; print('stage broke'); sys.exit(3)"]
    record = retrain.run(cfg, service.url, url, force=True, paths=Paths(tmp_path))
    assert record["decision"] == "retrain"
    assert "asked for with --force" in record["reasons"]
    assert record["result"]["snapshot"]["rows"] == 6
    assert len((tmp_path / cfg.data.feedback.snapshot).read_text().splitlines()) == 6
    assert record["result"]["pipeline"]["returncode"] == 3
    assert "stage broke" in record["result"]["pipeline"]["tail"]
    assert record["last_retraining"] is None
    again = retrain.run(cfg, service.url, url, dry_run=True, paths=Paths(tmp_path))
    assert again["signals"]["new_labels"] == 6


def test_an_unreachable_service_is_a_reason_not_a_crash(tmp_path, cfg):
    full = compose()
    record = retrain.run(full, "http://127.0.0.1:9", f"sqlite:///{tmp_path}/none.db",
                         dry_run=True, paths=Paths(tmp_path))
    assert record["decision"] == "no retraining"
    assert [t["reason"] for t in record["triggers"]] == [
        "the service's /metrics could not be read", "the service's /metrics could not be read",
        "the prediction log could not be read"]
    errors = record["signals"]["errors"]
    assert errors[0].startswith("service http://127.0.0.1:9:")
    assert errors[1].startswith("prediction log:") and "none.db" in errors[1]


# ---------------------------------------------------------------- alerting rules

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed "
                                    "(Debian's prometheus package)")


@needs_promtool
def test_alerting_rules_are_valid_and_raise_what_their_tests_expect():
    checked = subprocess.run([PROMTOOL, "check", "rules", "ops/prometheus/alerts.yml"], cwd=ROOT,
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 8 rules found" in checked.stdout
    tested = subprocess.run([PROMTOOL, "test", "rules", "ops/prometheus/alerts_test.yml"],
                            cwd=ROOT, capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr


@needs_promtool
def test_a_rule_that_misses_its_expected_alert_fails_the_rules_test(tmp_path):
    """The rules test can fail: with the accuracy floor lowered, its alert is missing."""
    rules = (ROOT / "ops/prometheus/alerts.yml").read_text()
    (tmp_path / "alerts.yml").write_text(rules.replace("textops_live_accuracy < 0.8",
                                                       "textops_live_accuracy < 0.5"))
    shutil.copy(ROOT / "ops/prometheus/alerts_test.yml", tmp_path)
    tested = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert tested.returncode != 0 and "TextopsLiveAccuracyLow" in tested.stdout + tested.stderr


def test_alerting_rules_use_the_retrain_thresholds(cfg):
    """Prometheus cannot read conf/: the rules repeat its numbers, and must agree."""
    rules = yaml.safe_load((ROOT / "ops/prometheus/alerts.yml").read_text())
    expr = {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}
    drift = expr["TextopsInputDrift"]
    # every PSI the triggers read, each bounded as they bound it
    for gauge in DRIFT_METRICS.values():
        assert f"label_replace({gauge}, " in drift, gauge
    assert drift.count(f"> {cfg.drift.min_psi}") == len(DRIFT_METRICS)
    assert drift.count(f"textops_drift_window_texts >= {cfg.drift.min_window}") == \
        len(DRIFT_METRICS)
    accuracy = expr["TextopsLiveAccuracyLow"]
    assert f"textops_live_accuracy < {cfg.accuracy.floor}" in accuracy
    assert f"textops_live_labels >= {cfg.accuracy.min_labels}" in accuracy
    # a next-word model's floor is its task's (conf/task/next_word.yaml)
    next_word = compose("task=next_word").retrain.accuracy
    words = expr["TextopsLiveNextWordAccuracyLow"]
    assert f"textops_live_accuracy < {next_word.floor}" in words
    assert f"textops_live_labels >= {next_word.min_labels}" in words
    assert 'textops_model_info{task="next_word"}' in accuracy and words
    assert expr["TextopsRetrainLabelsWaiting"].endswith(f">= {cfg.new_labels.min}")


def test_a_forced_retraining_without_a_readable_log_is_recorded_as_failed(tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = compose()
    params.retrain.prediction_log = f"sqlite:///{tmp_path}/none.db"
    params.retrain.service_url = "http://127.0.0.1:9"
    (tmp_path / "params.yaml").write_text(OmegaConf.to_yaml(params))
    with pytest.raises(SystemExit) as exited:
        retrain.main(["--force"])
    assert exited.value.code == 1
    record = json.loads((tmp_path / "reports/retrain.json").read_text())
    assert record["decision"] == "retrain"
    assert record["result"]["error"].startswith("the feedback could not be exported:")
    assert "none.db" in record["result"]["error"]
    printed = capsys.readouterr().out
    assert "retrain: retrain, because: asked for with --force" in printed
    assert "retrain: the feedback could not be exported: " in printed


def test_the_record_never_shows_the_log_database_password():
    """The record is printed (a pod's log) and kept in reports/retrain.json."""
    from pipeline.loops.retrain import without_password

    assert without_password("postgresql://textops:s3cret@db:5432/log") \
        == "postgresql://textops:***@db:5432/log"
    assert without_password("sqlite:///run/predictions.db") == "sqlite:///run/predictions.db"
