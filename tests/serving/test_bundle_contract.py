"""The bundle contract: a bundle names its task and its model's signature, and loading
refuses one that the service cannot serve or whose model is not what it declares,
naming the file."""

from __future__ import annotations

import json
import shutil

import onnxruntime as ort
import pytest

from serving.bundle import Bundle, BundleError
from serving.bundle.tasks import TASKS, signature


def bundle_copy(built_bundle, tmp_path, **changes):
    """A copy of the built bundle with bundle.json's fields changed."""
    source, _ = built_bundle
    copy = shutil.copytree(source, tmp_path / "bundle")
    meta = json.loads((copy / "bundle.json").read_text())
    meta.update(changes)
    (copy / "bundle.json").write_text(json.dumps(meta))
    return copy


def test_the_bundle_declares_its_task_and_the_signature_its_models_have(built_bundle):
    path, meta = built_bundle
    assert meta["task"] == "text_classification"
    for model in ("model.onnx", "model.int8.onnx"):
        session = ort.InferenceSession(str(path / model), providers=["CPUExecutionProvider"])
        assert signature(session) == meta["signature"]
    inputs = meta["signature"]["inputs"]
    assert list(inputs) == ["input_ids", "attention_mask"]
    assert {t["dtype"] for t in inputs.values()} == {"int64"}
    assert meta["signature"]["outputs"]["logits"]["shape"][1] == len(meta["label_names"])
    # the preprocessing the task declares travels in the bundle
    assert all((path / name).is_file() for name in TASKS[meta["task"]].preprocessing)


def test_a_bundle_of_another_task_is_refused_by_name(built_bundle, tmp_path):
    copy = bundle_copy(built_bundle, tmp_path, task="speech_recognition")
    with pytest.raises(BundleError) as err:
        Bundle.load(copy)
    assert str(copy / "bundle.json") in str(err.value)
    assert ("'speech_recognition' is not one this service serves (image_classification, "
            "next_word, text_classification)") in str(err.value)


@pytest.mark.parametrize("change,words", [
    (lambda s: s["inputs"]["input_ids"].update(dtype="float"),
     "input input_ids is int64, bundle.json says float"),
    (lambda s: s["outputs"]["logits"].update(shape=["batch"]),
     "output logits has 2 axes, bundle.json says 1"),
    (lambda s: s.update(inputs={"pixels": s["inputs"]["input_ids"]}),
     "bundle.json says ['pixels']"),
])
def test_a_model_that_breaks_the_declared_signature_is_refused(built_bundle, tmp_path,
                                                               change, words):
    _, meta = built_bundle
    declared = json.loads(json.dumps(meta["signature"]))
    change(declared)
    copy = bundle_copy(built_bundle, tmp_path, signature=declared)
    with pytest.raises(BundleError) as err:
        Bundle.load(copy, "fp32")
    assert str(copy / "model.onnx") in str(err.value) and words in str(err.value)


def test_a_bundle_written_before_tasks_loads_as_text_classification(built_bundle, tmp_path):
    source, meta = built_bundle
    copy = shutil.copytree(source, tmp_path / "bundle")
    old = {k: v for k, v in meta.items() if k not in ("task", "signature")}
    (copy / "bundle.json").write_text(json.dumps(old))
    bundle = Bundle.load(copy, "fp32")
    assert bundle.task.name == "text_classification"
    assert bundle.predict_proba(["a fine film"]).shape == (1, len(meta["label_names"]))

