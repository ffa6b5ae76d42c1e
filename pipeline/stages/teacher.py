"""teacher: the model a student learns from, when `distill.teacher` names one.

    distill.teacher: null                     nothing to do: the student trains on labels
    distill.teacher: train                    fine-tune `distill.teacher_model` (MiniLM by
                                              default) on the processed training split
    distill.teacher: models:/<name>@<alias>   a registered bundle (e.g. a MiniLM promoted
    distill.teacher: <directory>              earlier), or a bundle directory

Output: `models/teacher/`. Always `teacher.json` (the source, and the teacher's test
accuracy through the runtime that computes its logits); with a teacher, its bundle in
`bundle/` (exported, quantised and parity-checked like any deployed bundle, so it can
also be served), and for a trained one its checkpoints and test metrics. Teacher and
student read the same token ids (pipeline/stages/transfer.py), so the teacher's vocabulary must
be the processed one; anything else stops the stage with both files named.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline import atomic, logs, tasks
from pipeline.config import Paths, load_params
from pipeline.data.splits import column, load_splits


class TeacherError(RuntimeError):
    """The teacher cannot teach this student (no such bundle, another vocabulary)."""


class TeacherPaths(Paths):
    """Where a teacher trained here keeps what the train and deploy stages would write
    for a student: under models/teacher/, so neither overwrites the other."""

    @property
    def checkpoints(self) -> Path:
        return self.teacher / "checkpoints"

    @property
    def train_work(self) -> Path:
        return self.root / "models/teacher-work"

    @property
    def train_report(self) -> Path:
        return self.teacher / "train.json"

    @property
    def train_facts(self) -> Path:
        return self.run_facts("teacher")

    @property
    def train_curves(self) -> Path:
        return self.teacher / "train_curves.json"

    @property
    def candidate(self) -> Path:
        return self.teacher / "bundle"

    @property
    def metrics(self) -> Path:
        return self.teacher / "metrics.json"

    @property
    def gate(self) -> Path:
        return self.teacher / "gate.json"


def teacher_config(cfg: DictConfig) -> DictConfig:
    """The pipeline's configuration with the teacher's model and training settings."""
    teacher = OmegaConf.to_container(cfg, resolve=True)
    teacher["model"] = OmegaConf.to_container(cfg.distill.teacher_model)
    teacher["train"] = OmegaConf.to_container(cfg.distill.teacher_train)
    teacher["deploy"]["model_name"] = f"{cfg.deploy.model_name}-teacher"
    # Static int8 moves MiniLM's labels on 3.6% of SST-2 test rows, where a student's
    # check wants at most 1%: the teacher has its own bound, and none when its logits
    # come from fp32 (its int8 model is still built, its agreement recorded).
    teacher["deploy"]["int8_min_agreement"] = (
        0.0 if cfg.distill.teacher_precision == "fp32"
        else cfg.distill.teacher_int8_min_agreement)
    return OmegaConf.create(teacher)


def train_teacher(cfg: DictConfig, paths: TeacherPaths) -> Path:
    """Fine-tune the teacher, score its checkpoint on test, export its bundle."""
    from pipeline.modeling.training import fit
    from pipeline.stages.deploy import build_bundle

    teacher_cfg = teacher_config(cfg)
    print(f"teacher: fine-tuning {teacher_cfg.model.name} "
          f"({teacher_cfg.model.get('path', '')}) for {teacher_cfg.train.max_epochs} "
          "epoch(s)", flush=True)
    fit(teacher_cfg, paths, tags={"role": "teacher"})
    # imported here, not above: torch and torchmetrics take seconds to import, and
    # most runs of this stage have no teacher to train
    from pipeline.tasks.scoring import compute_metrics, predict_proba

    task = tasks.from_config(teacher_cfg)
    module = task.load_module(paths.checkpoint)
    test = load_splits(paths.processed)["test"]
    probs = predict_proba(task, module, test, cfg.evaluate.batch_size, paths)
    metrics = compute_metrics(probs, np.array(column(test, "label")),
                              list(module.hparams.label_names), cfg.evaluate.calibration_bins)
    atomic.write_json(paths.metrics, metrics)
    # a teacher is never served by the pipeline, so no gate judges it
    atomic.write_json(paths.gate, {"blessed": False,
                                   "reasons": ["a teacher for distillation: not gated"]})
    build_bundle(teacher_cfg, paths)
    return paths.candidate


def fetch_teacher(spec: str, paths: TeacherPaths) -> Path:
    """Copy a registered bundle (models:/...) or a bundle directory into the output."""
    with tempfile.TemporaryDirectory() as cache:
        from serving.engine.source import BundleSource

        source = BundleSource(spec, cache)
        try:
            local = source.fetch(source.identity())
        except Exception as err:  # registry unreachable, no such alias or directory
            raise TeacherError(f"distill.teacher: cannot fetch {spec!r} ({err})") from err
        if not (Path(local) / "bundle.json").is_file():
            raise TeacherError(f"distill.teacher: {local} holds no bundle.json")
        with atomic.atomic_dir(paths.candidate) as tmp:
            shutil.copytree(local, tmp, dirs_exist_ok=True)
    return paths.candidate


def check_vocabulary(bundle: Path, processed: Path, spec: str) -> None:
    """The student's token ids go to the teacher unchanged: one vocabulary for both."""
    from tokenizers import Tokenizer

    teacher = Tokenizer.from_file(str(bundle / "tokenizer.json")).get_vocab()
    student = Tokenizer.from_file(str(processed / "tokenizer.json")).get_vocab()
    if teacher != student:
        raise TeacherError(
            f"the teacher's vocabulary ({spec}: tokenizer.json, {len(teacher)} tokens) "
            f"is not the student's ({processed / 'tokenizer.json'}, {len(student)}): set "
            "preprocess.tokenizer to the teacher's (type=pretrained, path=its model)")


def teach(cfg: DictConfig, paths: TeacherPaths) -> dict:
    """Provide the configured teacher under models/teacher/; returns teacher.json."""
    spec = cfg.distill.teacher
    paths.teacher.mkdir(parents=True, exist_ok=True)
    if spec is None:
        report = {"teacher": None}
        print("teacher: none (distill.teacher is null): train learns from the labels")
    else:
        bundle = train_teacher(cfg, paths) if spec == "train" else fetch_teacher(spec, paths)
        check_vocabulary(bundle, paths.processed, spec)
        precision = cfg.distill.teacher_precision
        from serving.bundle import Bundle

        model = Bundle.load(bundle, precision)
        test = load_splits(paths.processed)["test"]
        requests = tasks.from_config(cfg).requests(test)
        logits = model.predict_logits(requests, cfg.distill.teacher_batch_size)
        accuracy = float((logits.argmax(1) == np.array(column(test, "label"))).mean())
        report = {"teacher": spec, "bundle_version": model.version,
                  "model": model.meta["model"], "precision": precision,
                  "test_accuracy": accuracy}
        print(f"teacher: {spec} (bundle {model.version}), test accuracy {accuracy:.4f} "
              f"({precision})", flush=True)
    atomic.write_json(paths.teacher / "teacher.json", report)
    return report


def main() -> None:
    logs.quiet()
    try:
        teach(load_params(), TeacherPaths())
    except TeacherError as err:
        sys.exit(f"teacher: {err}")


if __name__ == "__main__":
    main()
