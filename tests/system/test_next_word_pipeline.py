"""Next-word prediction end to end: `dvc repro` of the next-word smoke experiment
through every stage (the `next_word_repo` fixture), then what each stage left behind
and the service on its bundle."""

from __future__ import annotations

import json
import shutil
import sys

import httpx
import pytest
from conftest import run, running_service
from helpers import NOISE

from pipeline.config import Paths, load_params
from pipeline.data.splits import load_splits
from pipeline.tasks.next_word.task import NextWord
from pipeline.tasks.parity import DeployError
from serving.bundle import Bundle
from serving.bundle.decoding import generate
from serving.bundle.sampling import Sampling

pytestmark = pytest.mark.slow


def read(repo, path):
    return json.loads((repo / path).read_text())


def test_repro_runs_every_stage_on_a_corpus(next_word_repo):
    log = (next_word_repo / "repro.log").read_text()
    for stage in ("collect", "preprocess", "train", "evaluate", "deploy", "serve"):
        assert f"'{stage}'" in log
    manifest = read(next_word_repo, "data/raw/manifest.json")
    assert manifest["splits"]["train"]["rows"] == 300  # speeches, before carving
    profile = read(next_word_repo, "data/processed/profile.json")
    assert set(profile["leakage"]) == {"val", "test"}
    assert profile["tokenizer"]["type"] == "word"
    metrics = read(next_word_repo, "reports/metrics.json")
    baseline = metrics["baseline"]
    # model and n-gram scored on the very same test tokens, in the same run
    assert baseline["name"] == "kneser_ney_3" and baseline["tokens"] == metrics["tokens"]
    assert metrics["perplexity_vs_baseline"] == pytest.approx(
        metrics["perplexity"] / baseline["perplexity"])
    assert 0 < metrics["accuracy"] <= metrics["top5_accuracy"] <= 1
    # validation scored too (choices are made there), on its own tokens
    validation = metrics["validation"]
    assert validation["tokens"] != metrics["tokens"]
    assert validation["perplexity_per_word"] > validation["perplexity"] > 1
    assert validation["baseline_perplexity"] > 1
    plots = read(next_word_repo, "reports/plots/baseline.json")
    assert [row["model"] for row in plots] == ["candidate", "kneser_ney_3"]
    bundle = read(next_word_repo, "models/candidate/bundle.json")
    # the smoke model is an LSTM, as the default: its cache is its last state
    assert bundle["task"] == "next_word" and bundle["cache"] == "last"
    assert list(bundle["signature"]["inputs"]) == ["input_ids", "attention_mask",
                                                   "past_key_values"]
    # the drift reference: typed prompts' lengths and unknown words (preprocess), and
    # the model's surprisal at them (deploy, measured with the bundle)
    reference = bundle["profile"]["reference"]
    assert set(reference) == {"length", "mean_tokens", "unk_rate", "surprisal"}
    assert sum(reference["surprisal"]["shares"]) == pytest.approx(1)
    parity = bundle["parity"]
    assert parity["preprocessing_mismatches"] == 0 and not parity["greedy"]["different"]
    served = read(next_word_repo, "reports/serve.json")
    # the serve stage sent 20 test prompts over HTTP: every top-k equals the bundle's
    assert served["rows"] == 20 and served["mismatches"] == 0
    card = (next_word_repo / "models/candidate/MODEL_CARD.md").read_text()
    assert "language model predicting the next token" in card and "kneser_ney_3" in card


def test_a_second_evaluate_scores_the_champion_bundle_on_the_same_text(next_word_repo):
    """Once deploy promoted the model, evaluate scores that champion through its ONNX
    bundle (the LSTM's one-token graph, a token at a time with its cache) and compares
    perplexity per word: the same model scores the same."""
    run([sys.executable, "-m", "pipeline.stages.evaluate"], next_word_repo)
    gate = read(next_word_repo, "reports/gate.json")
    champion = gate["champion"]
    assert "error" not in champion, champion
    metrics = read(next_word_repo, "reports/metrics.json")
    assert champion["metrics"]["perplexity_per_word"] == pytest.approx(
        metrics["perplexity_per_word"], rel=1e-4)
    assert gate["blessed"] and any("perplexity_per_word" in r and "within" in r
                                   for r in gate["reasons"])


def test_the_next_word_repro_prints_no_dependency_noise(next_word_repo):
    log = (next_word_repo / "repro.log").read_text()
    noisy = [line for line in log.splitlines() if NOISE.search(line)]
    assert not noisy, "\n".join(noisy[:20])


def test_deploy_refuses_a_bundle_whose_tokenizer_differs_from_training(next_word_repo,
                                                                        tmp_path,
                                                                        monkeypatch):
    monkeypatch.chdir(next_word_repo)
    cfg, paths = load_params(next_word_repo / "params.yaml"), Paths(next_word_repo)
    task = NextWord()
    module = task.load_module(paths.checkpoint)
    test = load_splits(paths.processed)["test"]
    altered = shutil.copytree(paths.candidate, tmp_path / "bundle")
    assert task.check_bundle(altered, module, test, paths, cfg)["preprocessing_mismatches"] == 0
    tokenizer = json.loads((altered / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[5:7]  # two ordinary words swap ids
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (altered / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(DeployError, match="tokenizer.json gives other token ids than "
                                          "training for the test documents"):
        task.check_bundle(altered, module, test, paths, cfg)


def test_the_service_generates_what_the_bundle_generates_offline(next_word_repo, tmp_path):
    bundle_dir = next_word_repo / "models/candidate"
    offline = Bundle.load(bundle_dir, "int8").decoder
    prompt = "first citizen: we are"
    expected = generate(offline, prompt, Sampling(max_new_tokens=8))
    assert expected.generated  # something to compare
    with running_service(bundle_dir, tmp_path) as service:
        answer = httpx.post(f"{service.url}/generate",
                            json={"prompt": prompt, "max_new_tokens": 8}, timeout=30).json()
        top = httpx.post(f"{service.url}/predict", json={"texts": [prompt], "k": 3},
                         timeout=30).json()
    assert answer["text"] == expected.text and answer["finish_reason"] == expected.finish_reason
    assert [w["word"] for w in top["predictions"][0]["next_words"]] == [
        word for word, _ in offline.next_word_topk([prompt], 3)[0]]


def test_the_transformer_trains_and_deploys_with_its_cache(next_word_repo):
    """The Transformer (model.max_len = the block size: only positions a block
    reaches are trained) through train, evaluate and deploy in the same repository:
    int8 calibration and the parity checks feed it no position past its context. Runs
    last: it leaves the repository on the Transformer."""
    run([sys.executable, "-m", "pipeline.config", "task=next_word",
         "experiment=next_word_smoke", "model=lm_transformer_tiny"], next_word_repo)
    run(["dvc", "repro", "deploy"], next_word_repo, timeout=600)
    bundle = read(next_word_repo, "models/candidate/bundle.json")
    assert bundle["cache"] == "all" and bundle["max_len"] == 32  # the smoke block size
    # the drift reference: typed prompts' lengths and unknown words (preprocess), and
    # the model's surprisal at them (deploy, measured with the bundle)
    reference = bundle["profile"]["reference"]
    assert set(reference) == {"length", "mean_tokens", "unk_rate", "surprisal"}
    assert sum(reference["surprisal"]["shares"]) == pytest.approx(1)
    parity = bundle["parity"]
    assert parity["cached_max_abs_diff"] < 1e-4 and not parity["greedy"]["different"]
