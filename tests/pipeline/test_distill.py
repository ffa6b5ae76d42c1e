"""Distillation: the teacher and transfer stages and a student trained on their output
(pipeline/stages/teacher.py, pipeline/stages/transfer.py), on the shared synthetic workspace, whose
tiny Transformer bundle serves as the teacher."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import tracking_in
from omegaconf import OmegaConf

from pipeline import atomic
from pipeline.config import Paths
from pipeline.data.splits import NO_LABEL, column, load_dataset_dir, load_splits
from pipeline.modeling.training import fit
from pipeline.stages.teacher import TeacherError, TeacherPaths, teach
from pipeline.stages.transfer import build_transfer, transfer_texts
from pipeline.tasks.text_classification.inference import load_module, predict_logits
from serving.bundle import Bundle

AUGMENT = OmegaConf.create({"copies": 4, "mask_p": 0.1, "ngram_p": 0.25, "ngram_max": 5})
SENTENCES = [f"the {i} film was good and the cast was great but the plot was dull"
             for i in range(200)]


def test_the_transfer_set_repeats_per_seed_and_augments_as_configured():
    labels = [i % 2 for i in range(len(SENTENCES))]
    first = transfer_texts(SENTENCES, labels, AUGMENT, "[MASK]", seed=1)
    assert transfer_texts(SENTENCES, labels, AUGMENT, "[MASK]", seed=1) == first
    assert transfer_texts(SENTENCES, labels, AUGMENT, "[MASK]", seed=2) != first
    texts, out_labels = first
    # each sentence keeps its label and comes first; its copies carry none
    originals = [i for i, label in enumerate(out_labels) if label != NO_LABEL]
    assert [texts[i] for i in originals] == SENTENCES
    assert [out_labels[i] for i in originals] == labels
    copies = [t for t, label in zip(texts, out_labels, strict=True) if label == NO_LABEL]
    assert len(SENTENCES) * 3 < len(copies) <= len(SENTENCES) * 4  # duplicates dropped
    words = [w for copy in copies for w in copy.split()]
    masked = words.count("[MASK]") / len(words)
    assert 0.06 < masked < 0.14  # mask_p 0.1
    cut = sum(len(copy.split()) <= 5 for copy in copies) / len(copies)
    assert 0.17 < cut < 0.33  # ngram_p 0.25, n from 1 to 5 of 15 words
    # no masking, no n-grams: nothing new to add
    plain = OmegaConf.merge(AUGMENT, {"mask_p": 0.0, "ngram_p": 0.0})
    assert transfer_texts(SENTENCES, labels, plain, "[MASK]", seed=1) == (SENTENCES, labels)


@pytest.fixture(scope="module")
def distilled(workspace, built_bundle, tmp_path_factory):
    """The teacher stage with the workspace's bundle as teacher, then the transfer
    stage, in a copy of the workspace's processed data."""
    path, cfg = workspace
    root = tmp_path_factory.mktemp("distill")
    shutil.copytree(path / "data/processed", root / "data/processed")
    cfg = OmegaConf.merge(cfg, {"distill": {"teacher": str(built_bundle[0]),
                                            "teacher_precision": "fp32"}})
    paths = TeacherPaths(root)
    teacher = teach(cfg, paths)
    transfer = build_transfer(cfg, paths)
    return root, cfg, teacher, transfer


def test_the_teacher_stage_copies_and_scores_the_teacher(distilled, built_bundle):
    root, _, teacher, _ = distilled
    assert (root / "models/teacher/bundle/bundle.json").is_file()
    assert teacher["bundle_version"] == built_bundle[1]["version"]
    test = load_splits(root / "data/processed")["test"]
    model = Bundle.load(root / "models/teacher/bundle", "fp32")
    expected = (model.predict_logits(column(test, "text")).argmax(1)
                == np.array(column(test, "label"))).mean()
    assert teacher["test_accuracy"] == pytest.approx(expected)
    assert atomic.read_json(root / "models/teacher/teacher.json") == teacher


def test_the_transfer_set_holds_the_teachers_logits(distilled):
    root, cfg, _, transfer = distilled
    dataset = load_dataset_dir(root / "data/transfer/dataset")
    train = load_splits(root / "data/processed")["train"]
    assert transfer["labelled_rows"] == train.num_rows
    assert transfer["rows"] == dataset.num_rows == train.num_rows + transfer["augmented_rows"]
    assert transfer["augmented_rows"] > 2 * train.num_rows
    teacher = Bundle.load(root / "models/teacher/bundle", "fp32")
    sample = list(range(0, dataset.num_rows, 97))
    ids = [dataset[i]["input_ids"] for i in sample]
    assert ids == teacher.encode([dataset[i]["text"] for i in sample])  # one vocabulary
    expected = np.concatenate([teacher.run([row]) for row in ids])
    stored = np.array([dataset[i]["teacher_logits"] for i in sample])
    np.testing.assert_allclose(stored, expected, atol=1e-4)


STUDENTS = {  # smaller than the teacher (d_model 32): a copy of it would be the teacher
    "transformer": {"name": "transformer", "d_model": 16, "n_heads": 2, "n_layers": 1,
                    "d_ff": 32, "dropout": 0.1, "pooling": "mean"},
    "lstm": {"name": "lstm", "embedding_dim": 16, "hidden_size": 16, "num_layers": 1,
             "dropout": 0.1},
}


@pytest.mark.parametrize("student", STUDENTS)
def test_a_student_on_the_teachers_logits_matches_them_better_than_one_on_labels(
        distilled, tmp_path, student):
    """The known answer: trained to reproduce the teacher's logits, a student's logits
    on unseen texts are closer to the teacher's than a label-trained student's."""
    root, cfg, _, _ = distilled
    cfg = OmegaConf.merge(cfg, {"distill": {"weight": 1.0},
                                "mlflow": {"tracking_uri": tracking_in(
                                    tmp_path, cfg.mlflow.experiment)}})
    cfg.model = STUDENTS[student]
    test = load_splits(root / "data/processed")["test"]
    teacher = Bundle.load(root / "models/teacher/bundle", "fp32")
    target = teacher.predict_logits(column(test, "text"))

    def student_gap(name: str, transfer) -> float:
        run = Paths(tmp_path / name)
        shutil.copytree(root / "data/processed", run.processed)
        fit(cfg, run, transfer=transfer)
        student = load_module(run.checkpoint)
        logits = predict_logits(student, column(test, "input_ids"), 64)
        return float(np.mean((logits - target) ** 2))

    distilled_gap = student_gap("distilled", root / "data/transfer/dataset")
    label_gap = student_gap("labelled", None)
    assert distilled_gap < 0.7 * label_gap, (distilled_gap, label_gap)  # seen: 0.33, 0.49


def test_a_teacher_with_another_vocabulary_is_refused(workspace, built_bundle, tmp_path):
    path, cfg = workspace
    other = shutil.copytree(built_bundle[0], tmp_path / "other-teacher")
    vocabulary = atomic.read_json(other / "tokenizer.json")
    vocabulary["model"]["vocab"]["zzzunseen"] = len(vocabulary["model"]["vocab"])
    atomic.write_json(other / "tokenizer.json", vocabulary)
    shutil.copytree(path / "data/processed", tmp_path / "data/processed")
    cfg = OmegaConf.merge(cfg, {"distill": {"teacher": str(other)}})
    refusal = (r"vocabulary \(.*other-teacher: tokenizer.json, 304 tokens\) is not the "
               r"student's \(.*data/processed/tokenizer.json, 303\)")
    with pytest.raises(TeacherError, match=refusal):
        teach(cfg, TeacherPaths(tmp_path))


def test_without_a_teacher_both_stages_only_say_so(workspace, tmp_path):
    path, cfg = workspace
    shutil.copytree(path / "data/processed", tmp_path / "data/processed")
    paths = TeacherPaths(tmp_path)
    assert teach(cfg, paths) == {"teacher": None}
    assert build_transfer(cfg, paths) == {"teacher": None}
    assert sorted(p.name for p in (tmp_path / "data/transfer").iterdir()) == ["transfer.json"]


def test_a_registered_teacher_is_fetched_by_its_alias(workspace, built_bundle, tmp_path,
                                                      monkeypatch):
    import mlflow
    from conftest import inside, restored_tracking_uri

    from pipeline.tracking import registry

    path, cfg = workspace
    bundle_dir, meta = built_bundle
    database = f"sqlite:///{tmp_path}/mlflow.db"
    with restored_tracking_uri(), inside(tmp_path):
        mlflow.set_tracking_uri(database)
        client = mlflow.MlflowClient()
        run = client.create_run(client.create_experiment("teachers")).info.run_id
        version = registry.register(bundle_dir, meta, run)
        client.set_registered_model_alias(meta["model_name"], "teacher", version)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", database)
    shutil.copytree(path / "data/processed", tmp_path / "data/processed")
    cfg = OmegaConf.merge(cfg, {"distill": {
        "teacher": f"models:/{meta['model_name']}@teacher"}})
    teacher = teach(cfg, TeacherPaths(tmp_path))
    assert teacher["bundle_version"] == meta["version"]
    assert (tmp_path / "models/teacher/bundle/model.int8.onnx").is_file()
    with pytest.raises(TeacherError, match="cannot fetch 'models:/nothing@teacher'"):
        teach(OmegaConf.merge(cfg, {"distill": {"teacher": "models:/nothing@teacher"}}),
              TeacherPaths(tmp_path / "other"))


def test_the_teacher_trains_with_its_own_settings_and_never_the_students():
    from conftest import compose

    from pipeline.stages.teacher import teacher_config

    cfg = compose("experiment=distill", "train.lr=0.123", "distill.teacher_precision=fp32")
    teacher = teacher_config(cfg)
    assert teacher.model.name == "pretrained" and cfg.model.name == "lstm"
    assert teacher.train == cfg.distill.teacher_train and teacher.train.lr != 0.123
    assert cfg.train.ema_decay == 0.999 and teacher.train.ema_decay is None
    assert teacher.deploy.model_name == "sst2-classifier-teacher"
    # its int8 model computes nothing here, so int8 parity does not stop the stage;
    # when it does, the teacher has its own bound
    assert teacher.deploy.int8_min_agreement == 0.0
    assert cfg.deploy.int8_min_agreement == 0.99
    assert teacher_config(compose("experiment=distill")).deploy.int8_min_agreement == 0.95
