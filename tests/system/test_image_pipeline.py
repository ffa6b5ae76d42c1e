"""Image classification end to end: `dvc repro` of the image smoke experiment through
every stage (the `image_repo` fixture), then what each stage left behind."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from conftest import run
from helpers import NOISE

from pipeline.config import Paths, load_params
from pipeline.data.splits import load_splits
from pipeline.tasks.image_classification.task import ImageClassification
from pipeline.tasks.parity import DeployError, check_parity
from serving.bundle import Bundle

pytestmark = pytest.mark.slow


def read(repo, path):
    return json.loads((repo / path).read_text())


def test_repro_runs_every_stage_on_images(image_repo):
    log = (image_repo / "repro.log").read_text()
    for stage in ("collect", "preprocess", "train", "evaluate", "deploy", "serve"):
        assert f"'{stage}'" in log
    manifest = read(image_repo, "data/raw/manifest.json")
    assert manifest["image"]["height"] == 28 and manifest["image"]["channels"] == 1
    assert manifest["splits"]["train"]["rows"] == 600
    profile = read(image_repo, "data/processed/profile.json")
    assert set(profile["leakage"]) == {"val", "test"}
    assert profile["splitting"]["groups_from"] == "near-duplicate clusters"
    metrics = read(image_repo, "reports/metrics.json")
    assert metrics["rows"] == 600 and len(metrics["per_class"]) == 10
    assert metrics["accuracy"] > 0.3  # ten classes: chance is 0.1
    bundle = read(image_repo, "models/candidate/bundle.json")
    assert bundle["task"] == "image_classification"
    assert list(bundle["signature"]["inputs"]) == ["pixels"]
    assert bundle["parity"]["preprocessing_mismatches"] == 0
    assert (image_repo / "models/candidate/image_spec.json").is_file()
    served = read(image_repo, "reports/serve.json")
    # the serve stage sent 50 test images over HTTP as base64 PNGs: every answer
    # equals the bundle's offline one
    assert served["rows"] == 50 and served["mismatches"] == 0
    card = (image_repo / "models/candidate/MODEL_CARD.md").read_text()
    assert "image classifier over 10 classes" in card and "28x28" in card


def test_the_image_repro_prints_no_dependency_noise(image_repo):
    log = (image_repo / "repro.log").read_text()
    noisy = [line for line in log.splitlines() if NOISE.search(line)]
    assert not noisy, "\n".join(noisy[:20])


def test_the_spec_parity_check_fails_when_the_saved_spec_is_altered(image_repo, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(image_repo)
    cfg, paths = load_params(image_repo / "params.yaml"), Paths(image_repo)
    task = ImageClassification()
    module = task.load_module(paths.checkpoint)
    test = load_splits(paths.processed)["test"].select(range(40))
    altered = shutil.copytree(paths.candidate, tmp_path / "bundle")
    check_parity(altered, task, module, task.requests(test), task.model_inputs(test, paths),
                 cfg)  # as deployed: passes
    spec = json.loads((altered / "image_spec.json").read_text())
    spec["mean"] = [spec["mean"][0] + 0.01]
    (altered / "image_spec.json").write_text(json.dumps(spec))
    with pytest.raises(DeployError, match="image_spec.json gives other model inputs than "
                                          "training for 40 test rows"):
        check_parity(altered, task, module, task.requests(test),
                     task.model_inputs(test, paths), cfg)


def test_the_bundle_answers_an_encoded_file_as_training_saw_its_pixels(image_repo):
    paths = Paths(image_repo)
    task = ImageClassification()
    test = load_splits(paths.processed)["test"].select(range(16))
    bundle = Bundle.load(paths.candidate, "fp32")
    from_files = bundle.predict_logits(task.requests(test))
    module = task.load_module(paths.checkpoint)
    reference = task.predict_logits(module, task.model_inputs(test, paths), 16)
    assert np.abs(from_files - reference).max() < 1e-4


def test_a_second_repro_is_a_no_op(image_repo):
    # Bytecode caches that a stage writes into the code the stages depend on (where
    # PYTHONDONTWRITEBYTECODE is not set, as on most machines) change nothing.
    run([sys.executable, "-m", "compileall", "-q", "pipeline", "serving"], image_repo)
    result = run([sys.executable, "-m", "dvc", "repro"], image_repo)
    output = result.stdout + result.stderr
    assert "didn't change, skipping" in output and "Running stage" not in output
