"""serve: the canary against the real service, called directly."""

from __future__ import annotations

import json
import signal
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.config import Paths
from pipeline.data.splits import load_splits
from pipeline.stages import serve
from serving.bundle import Bundle


def test_canary_answers_equal_the_offline_predictions(workspace, built_bundle):
    path, cfg = workspace
    bundle_dir, meta = built_bundle
    paths = Paths(path)
    assert paths.candidate == bundle_dir
    report = serve.check_service(cfg, paths)
    saved = json.loads(paths.serve_report.read_text())
    facts = json.loads(paths.run_facts("serve").read_text())
    test_rows = len(load_splits(paths.processed)["test"])
    assert {**saved, **facts} == report
    assert not {"latency_ms", "service_exit_code"} & set(saved)  # facts of this run only
    assert report["bundle_version"] == meta["version"]
    assert report["rows"] == min(cfg.serve.canary_rows, test_rows)
    assert report["mismatches"] == 0 and report["max_abs_prob_diff"] <= serve.CANARY_TOLERANCE
    # stopped by SIGTERM (uvicorn re-raises it after draining), never by SIGKILL
    assert report["service_exit_code"] in (0, -signal.SIGTERM)
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]


def test_canary_counts_exactly_the_answers_that_differ(live_service, built_bundle):
    bundle = Bundle.load(built_bundle[0], "int8")
    texts = ["great superb film", "awful dull boring plot", "fine movie", "bad weak acting",
             "lovely story"]
    right = np.concatenate([bundle.predict_proba([t]) for t in texts])
    assert serve.canary(live_service.url, texts, right, bundle.label_names)["mismatches"] == 0
    expected = right.copy()
    expected[1] = expected[1, ::-1]  # another label, as if another model answered
    top = int(expected[3].argmax())  # the same label, probabilities off by 1e-3
    expected[3, top] += 1e-3
    expected[3, 1 - top] -= 1e-3
    result = serve.canary(live_service.url, texts, expected, bundle.label_names)
    # rows 0, 2 and 4 still agree: one mismatch must not count the rows after it
    assert result["mismatches"] == 2 and result["first_mismatch"] == 1
    assert result["max_abs_prob_diff"] == pytest.approx(np.abs(right[1] - right[1, ::-1]).max(),
                                                        abs=1e-5)


def test_a_service_that_answers_otherwise_fails_the_stage(workspace, built_bundle,
                                                          monkeypatch):
    path, cfg = workspace
    paths = Paths(path)
    paths.serve_report.unlink(missing_ok=True)
    offline = Bundle.predict_proba
    monkeypatch.setattr(Bundle, "predict_proba", lambda self, texts: offline(self, texts) * 0.5)
    with pytest.raises(serve.CanaryError, match="canary answers differ from the offline"):
        serve.check_service(cfg, paths)
    assert not paths.serve_report.exists()  # no report claims a pass


def test_next_word_canary_prompts_fit_the_models_context():
    """Half a long speech can outgrow a Transformer's context: such prompts are passed
    over for the next ones, never sent to fail offline or in the service."""
    words = SimpleNamespace(encode=lambda texts: [t.split() for t in texts])
    documents = ["a b c d e f g h i j", "k l", "m n o p q r", "s t u v"]
    bounded = SimpleNamespace(meta={"max_len": 4}, inputs=words)  # prompts of <= 3 words
    assert serve.canary_prompts(documents, 2, bounded) == ["k", "m n o"]
    unbounded = SimpleNamespace(meta={"max_len": None}, inputs=words)  # an LSTM's state
    assert serve.canary_prompts(documents, 2, unbounded) == ["a b c d e", "k"]
