"""Drift metrics: known PSI values for a shifted window, and a window that starts over
with the bundle (also when the old bundle's last batch finishes after the reload)."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import httpx
from conftest import eventually, running_service
from prometheus_client import generate_latest

from serving.monitoring.drift import DriftMonitor
from serving.monitoring.metrics import BatchStats, ServiceMetrics

# Training reference: lengths < 5 | 5..9 | >= 10 tokens in shares 1/4, 1/2, 1/4; one
# token in ten unknown; classes balanced.
REFERENCE = {"length": {"edges": [5, 10], "shares": [0.25, 0.5, 0.25]},
             "unk_rate": 0.1, "class_shares": [0.5, 0.5]}


def gauges(collector) -> dict[str, float]:
    """{name or name{label}: value} of what a collector yields on scrape."""
    values = {}
    for family in collector.collect():
        for sample in family.samples:
            label = "".join(f"{{{v}}}" for v in sample.labels.values())
            values[sample.name + label] = sample.value
    return values


def fake_bundle(names: list[str], reference: dict | None = REFERENCE):
    meta = {"version": "v", "model_name": "m", "label_names": names,
            "profile": {"reference": reference}}
    return SimpleNamespace(meta=meta, precision="int8", label_names=names)


def stats(bundle, lengths, unknown, predicted) -> BatchStats:
    return BatchStats(texts=len(lengths), requests=1, groups=1, real_tokens=sum(lengths),
                      padded_tokens=sum(lengths), seconds=0.0, lengths=lengths,
                      unknown=unknown, predicted=predicted, bundle=bundle)


def test_shifted_window_gives_the_psi_computed_by_hand():
    model = object()
    drift = DriftMonitor(window=100)
    drift.reset(REFERENCE, ["neg", "pos"], model=model)
    # lengths 3 | 7 | 15, 15: shares 1/4, 1/4, 1/2 (longer texts than in training);
    # 8 of the 40 tokens unknown (rate 0.2); predicted neg, pos, pos, pos
    drift.observe(model, [3, 7, 15, 15], [0, 0, 4, 4], [0, 1, 1, 1])
    values = gauges(drift)
    # PSI = sum (actual - expected) * ln(actual / expected), bucket by bucket:
    length = 0 + (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.5 - 0.25) * math.log(0.5 / 0.25)
    unknown = (0.2 - 0.1) * math.log(0.2 / 0.1) + (0.8 - 0.9) * math.log(0.8 / 0.9)
    classes = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    assert math.isclose(length, 0.5 * math.log(2))  # the arithmetic itself, once more
    assert values["textops_drift_window_texts"] == 4
    assert math.isclose(values["textops_drift_length_psi"], length, rel_tol=1e-9)
    assert math.isclose(values["textops_unknown_token_rate"], 0.2, rel_tol=1e-9)
    assert math.isclose(values["textops_drift_unknown_token_psi"], unknown, rel_tol=1e-9)
    assert math.isclose(values["textops_drift_predicted_class_psi"], classes, rel_tol=1e-9)
    assert values["textops_predicted_class_share{neg}"] == 0.25
    assert values["textops_predicted_class_share{pos}"] == 0.75


def test_a_window_like_the_training_data_has_no_drift():
    model = object()
    drift = DriftMonitor(window=100)
    drift.reset(REFERENCE, ["neg", "pos"], model=model)
    drift.observe(model, [3, 7, 7, 15], [0, 1, 1, 2], [0, 1, 0, 1])
    values = gauges(drift)
    assert abs(values["textops_drift_length_psi"]) < 1e-12
    assert abs(values["textops_drift_predicted_class_psi"]) < 1e-12


def test_an_image_window_reports_brightness_and_contrast_drift_and_no_token_figures():
    # an image model's reference: brightness and contrast deciles (here two bins each)
    reference = {"brightness": {"edges": [0.5], "shares": [0.5, 0.5]},
                 "contrast": {"edges": [0.2], "shares": [0.5, 0.5]},
                 "class_shares": [0.5, 0.5]}
    model, drift = object(), DriftMonitor(window=100)
    drift.reset(reference, ["cat", "dog"], model=model)
    # three of four images bright (over 0.5); contrast as in training
    drift.observe(model, [], [], [0, 1, 0, 1], features={"brightness": [0.1, 0.6, 0.7, 0.9],
                                                       "contrast": [0.1, 0.1, 0.3, 0.3]})
    values = gauges(drift)
    expected = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    assert values["textops_drift_window_texts"] == 4
    assert math.isclose(values["textops_drift_brightness_psi"], expected, rel_tol=1e-9)
    assert abs(values["textops_drift_contrast_psi"]) < 1e-12
    assert abs(values["textops_drift_predicted_class_psi"]) < 1e-12
    assert "textops_drift_length_psi" not in values
    assert "textops_unknown_token_rate" not in values


def test_a_batch_of_the_old_bundle_finishing_after_a_reload_is_left_out():
    """A batch run on a 3-class bundle reports after the swap to a 2-class one."""
    old, new = fake_bundle(["neg", "neutral", "pos"]), fake_bundle(["bad", "good"])
    metrics = ServiceMetrics(drift_window=100)
    metrics.set_model(old)
    metrics.observe_batch(stats(old, [7], [0], [2]))
    metrics.set_model(new)  # the reload
    metrics.observe_batch(stats(old, [7, 7], [0, 0], [2, 1]))  # late: class 2 is gone
    text = generate_latest(metrics.registry).decode()  # must not raise
    assert "textops_drift_window_texts 0.0" in text
    metrics.observe_batch(stats(new, [7], [0], [1]))
    values = gauges(metrics.drift)
    assert values["textops_drift_window_texts"] == 1
    assert values["textops_predicted_class_share{good}"] == 1.0
    assert "textops_predicted_class_share{neutral}" not in values


# ---------------------------------------------------------------- through the service


def scrape(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("textops_drift") or line.startswith("textops_predicted"):
            name, value = line.rsplit(" ", 1)
            values[name.replace('label="', "").replace('"', "")] = float(value)
    return values


def settled(url: str, texts: int) -> dict[str, float]:
    """A scrape whose window holds `texts` texts: with several server processes the
    one answering sees another's window within 0.2 s (serving/processes/workers.py)."""
    return eventually(lambda: (values := scrape(url))["textops_drift_window_texts"] == texts
                      and values, timeout=5)


def test_drift_after_a_reload_compares_the_new_bundle_with_its_own_reference(
        built_bundle, tmp_path):
    """Texts scored by the old bundle leave the window; the new bundle's classes and
    training reference are the ones compared with."""
    new = tmp_path / "renamed"
    shutil.copytree(built_bundle[0], new)
    meta = json.loads((new / "bundle.json").read_text())
    meta["version"], meta["label_names"] = "v-renamed", ["bad", "good"]
    meta["profile"]["reference"] = {**meta["profile"]["reference"],
                                    "class_shares": [0.5, 0.5]}
    (new / "bundle.json").write_text(json.dumps(meta))
    negative, positive = "awful dull boring plot", "great superb film"
    with running_service(built_bundle[0], tmp_path, admin_token="t",
                         watch_interval_s=0) as service:
        url = service.url
        httpx.post(f"{url}/predict", json={"texts": [positive] * 5}, timeout=30)
        assert settled(url, 5)["textops_drift_window_texts"] == 5
        reload = httpx.post(f"{url}/admin/reload", json={"bundle": str(new)},
                            headers={"Authorization": "Bearer t"}, timeout=30)
        assert reload.status_code == 200, reload.text
        after = settled(url, 0)
        assert after["textops_drift_window_texts"] == 0
        assert not any("{neg}" in name or "{pos}" in name for name in after)
        answer = httpx.post(f"{url}/predict", json={"texts": [negative] * 3 + [positive]},
                            timeout=30).json()
        assert [p["label"] for p in answer["predictions"]] == ["bad"] * 3 + ["good"]
        values = settled(url, 4)
    assert values["textops_drift_window_texts"] == 4
    assert values["textops_predicted_class_share{bad}"] == 0.75
    assert values["textops_predicted_class_share{good}"] == 0.25
    classes = (0.75 - 0.5) * math.log(0.75 / 0.5) + (0.25 - 0.5) * math.log(0.25 / 0.5)
    assert math.isclose(values["textops_drift_predicted_class_psi"], classes, rel_tol=1e-6)
