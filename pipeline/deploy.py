"""deploy: export the best checkpoint to a self-contained bundle, check it, register
it in the MLflow Model Registry, and promote it when the gate blessed it.

1. Export to ONNX with dynamic batch and sequence axes, and an int8 variant made by
   *static* quantisation calibrated on validation rows. (Dynamic quantisation picks
   activation scales per batch, so a text's answer would shift with its batch
   companions; fixed scales do not.)
2. Parity checks on the test split fail the stage: the saved tokenizer reproduces the
   training token ids; fp32 ONNX logits match PyTorch within `fp32_max_abs_diff`;
   int8 labels agree with PyTorch on at least `int8_min_agreement` of rows; a text's
   logits alone match its logits inside a padded batch (fp32 within
   `fp32_max_abs_diff`, int8 within `int8_batch_max_abs_diff`).
3. The bundle (`models/candidate/`): both models, tokenizer.json, bundle.json and
   MODEL_CARD.md.
4. A new version of the registered pyfunc model, tagged with the gate's verdict.
   Only a blessed version gets the `champion` alias and becomes `models/current`
   (a symlink into `models/bundles/`, swapped atomically).

`python -m pipeline.deploy rollback` (`make rollback`) moves `champion` and `current`
back to the previous blessed version.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from omegaconf import DictConfig
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from pipeline import atomic
from pipeline.config import (
    BEST_CHECKPOINT,
    BUNDLE_STORE,
    CANDIDATE_BUNDLE,
    CURRENT_BUNDLE,
    DEPLOY_REPORT,
    GATE_FILE,
    METRICS_FILE,
    PROCESSED_DIR,
    TRAIN_REPORT,
    git_commit,
    load_params,
    tracking_uri,
)
from pipeline.evaluate import CHAMPION, load_module, predict_logits
from pipeline.splits import column, load_splits
from serving.bundle import MODEL_FILES, Bundle

SERVE_REQUIREMENTS = [
    "numpy==2.4.6", "onnxruntime==1.32.0", "tokenizers==0.23.3", "pandas==3.1.1",
]


class DeployError(RuntimeError):
    """A check failed: nothing was registered or promoted."""


# ---------------------------------------------------------------- export


def export_onnx(model: torch.nn.Module, path: Path, opset: int, pad_id: int) -> None:
    """ONNX with dynamic batch and sequence axes, weights inside the one file.

    The torch.export-based exporter is the default; a model whose graph it cannot
    keep dynamic says `onnx_exporter = "torchscript"` (the LSTM: torch.export
    specialises nn.LSTM to the example's shape).
    """
    model.eval()
    input_ids = torch.full((2, 8), pad_id + 1, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0  # trace the padded case too
    axes = {0: "batch", 1: "sequence"}
    common = {"input_names": ["input_ids", "attention_mask"], "output_names": ["logits"],
              "opset_version": opset}
    if getattr(model, "onnx_exporter", "dynamo") == "torchscript":
        torch.onnx.export(model, (input_ids, attention_mask), str(path), dynamo=False,
                          dynamic_axes={"input_ids": axes, "attention_mask": axes,
                                        "logits": {0: "batch"}}, **common)
        return
    torch.onnx.export(model, (input_ids, attention_mask), str(path), dynamo=True,
                      dynamic_shapes={"input_ids": axes, "attention_mask": axes},
                      external_data=False, verbose=False, **common)


class Calibration(CalibrationDataReader):
    """Padded batches of validation rows for static int8 calibration."""

    def __init__(self, rows: list[list[int]], pad_id: int, batch_size: int = 32,
                 sort: bool = True):
        if sort:
            rows = sorted(rows, key=len)  # batches of similar length, as served
        self.batches = [self._pad(rows[i : i + batch_size], pad_id)
                        for i in range(0, len(rows), batch_size)]
        self.position = 0

    @staticmethod
    def _pad(rows: list[list[int]], pad_id: int) -> dict[str, np.ndarray]:
        longest = max(map(len, rows))
        ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = row, 1
        return {"input_ids": ids, "attention_mask": mask}

    def get_next(self) -> dict | None:
        if self.position == len(self.batches):
            return None
        self.position += 1
        return self.batches[self.position - 1]


# Activation schemes tried for int8: symmetric int8 or asymmetric uint8 (skewed
# activations, as in pre-trained encoders, fit the latter better). Both are static
# (fixed scales), so a text's answer never depends on its batch companions.
INT8_SCHEMES = {
    "symmetric": {"activation_type": QuantType.QInt8,
                  "extra_options": {"ActivationSymmetric": True}},
    "asymmetric": {"activation_type": QuantType.QUInt8, "extra_options": {}},
}


def activation_products(model: Path) -> list[str]:
    """MatMul nodes that multiply two activations (attention scores and their use):
    their ranges vary with every input, so fixed int8 scales fit them badly."""
    graph = onnx.load(str(model)).graph
    constant = {i.name for i in graph.initializer}
    constant |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in graph.node
            if n.op_type == "MatMul" and not any(i in constant for i in n.input)]


def quantize_int8(prepared: Path, int8: Path, calibration: Calibration, scheme: str) -> None:
    """Static QDQ int8 of the weight matrix multiplications, per-channel weights.

    `reduce_range` keeps weights to 7 bits: without VNNI (AVX2 only, as here) the
    u8 x s8 kernels accumulate pairs in int16 and saturate otherwise.
    """
    quantize_static(
        str(prepared), str(int8), calibration,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=True,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_exclude=activation_products(prepared),
        calibrate_method=CalibrationMethod.MinMax,
        **INT8_SCHEMES[scheme],
    )


def onnx_logits(model: Path, rows: list[list[int]], pad_id: int) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["logits"], batch)[0]
                           for batch in Calibration(rows, pad_id, sort=False).batches])


def length_stratified(rows: list[list[int]], count: int, seed: int, bands: int = 8
                      ) -> tuple[list[list[int]], list[list[int]]]:
    """About `count` rows spread evenly over the range of lengths, and the rest.

    Calibrating on rows as they come under-represents long texts (most SST-2 training
    phrases are short, its test sentences are not), and their activation ranges are
    then clipped; equal shares per length band cover them.
    """
    rng = np.random.default_rng(seed)
    lengths = np.array([len(r) for r in rows])
    edges = np.linspace(lengths.min(), lengths.max() + 1, bands + 1)
    chosen = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        band = np.flatnonzero((lengths >= low) & (lengths < high))
        chosen += rng.choice(band, min(len(band), count // bands), replace=False).tolist()
    taken = set(chosen)
    return [rows[i] for i in chosen], [r for i, r in enumerate(rows) if i not in taken]


def quantize_best(fp32: Path, int8: Path, module, val_rows: list[list[int]], cfg: DictConfig
                  ) -> dict:
    """Calibrate on some validation rows, compare the schemes on others, keep the one
    whose labels agree best with PyTorch."""
    pad_id = module.hparams.pad_id
    calibration_rows, rest = length_stratified(val_rows, cfg.deploy.calibration_rows, cfg.seed)
    check_rows = length_stratified(rest, 1024, cfg.seed)[0] if rest else calibration_rows
    reference = predict_logits(module, check_rows, cfg.evaluate.batch_size).argmax(1)
    agreement = {}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Symbolic shape inference cannot follow the exporter's dynamic shapes; the
        # ONNX shape inference and graph optimisation steps still apply.
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        for scheme in INT8_SCHEMES:
            candidate = Path(tmp) / f"{scheme}.onnx"
            quantize_int8(prepared, candidate, Calibration(calibration_rows, pad_id), scheme)
            labels = onnx_logits(candidate, check_rows, pad_id).argmax(1)
            agreement[scheme] = float((labels == reference).mean())
        best = max(agreement, key=agreement.get)
        shutil.move(Path(tmp) / f"{best}.onnx", int8)
    return {"scheme": best, "validation_agreement": agreement}


# ---------------------------------------------------------------- checks


def check_parity(bundle_dir: Path, module, texts: list[str], ids: list[list[int]],
                 cfg: DictConfig) -> dict:
    """Compare the bundle with PyTorch on the test split; DeployError when broken."""
    reference = predict_logits(module, ids, cfg.evaluate.batch_size)
    fp32 = Bundle.load(bundle_dir, "fp32")
    int8 = Bundle.load(bundle_dir, "int8")
    mismatched = [i for i, (a, b) in enumerate(zip(fp32.encode(texts), ids, strict=True))
                  if a != b]
    fp32_diff = float(np.abs(fp32.predict_logits(texts) - reference).max())
    int8_logits = int8.predict_logits(texts)
    agreement = float((int8_logits.argmax(1) == reference.argmax(1)).mean())
    sample = texts[: min(64, len(texts))]
    report = {
        "rows": len(texts),
        "tokenizer_mismatches": len(mismatched),
        "fp32_max_abs_diff": fp32_diff,
        "int8_label_agreement": agreement,
        "int8_max_abs_diff": float(np.abs(int8_logits - reference).max()),
        "batch_invariance_max_abs_diff": {
            "fp32": batch_invariance(fp32, sample), "int8": batch_invariance(int8, sample)
        },
    }
    problems = []
    if mismatched:
        problems.append(f"tokenizer.json gives other token ids than training for "
                        f"{len(mismatched)} test rows (first: row {mismatched[0]})")
    if fp32_diff > cfg.deploy.fp32_max_abs_diff:
        problems.append(f"fp32 ONNX logits differ from PyTorch by {fp32_diff:.2e} "
                        f"(allowed {cfg.deploy.fp32_max_abs_diff:.0e})")
    if agreement < cfg.deploy.int8_min_agreement:
        problems.append(f"int8 labels agree with PyTorch on {agreement:.4f} of test rows "
                        f"(required {cfg.deploy.int8_min_agreement})")
    allowed = batch_tolerances(cfg)
    for precision, diff in report["batch_invariance_max_abs_diff"].items():
        if diff > allowed[precision]:
            problems.append(f"{precision}: a text's logits change with its batch by {diff:.2e} "
                            f"(allowed {allowed[precision]:.0e})")
    if problems:
        raise DeployError("; ".join(problems))
    return report


def batch_tolerances(cfg: DictConfig) -> dict[str, float]:
    """How far a text's logits may move between being scored alone and in a batch."""
    return {"fp32": cfg.deploy.fp32_max_abs_diff, "int8": cfg.deploy.int8_batch_max_abs_diff}


def batch_invariance(bundle: Bundle, texts: list[str]) -> float:
    """Largest logit change between a text scored alone and inside one padded batch."""
    alone = np.concatenate([bundle.run(bundle.encode([t])) for t in texts])
    together = bundle.run(bundle.encode(texts))
    return float(np.abs(alone - together).max())


# ---------------------------------------------------------------- the bundle


def bundle_meta(cfg: DictConfig, module, train_report: dict, metrics: dict, verdict: dict,
                profile: dict, pad_id: int) -> dict:
    created = dt.datetime.now(dt.UTC)
    return {
        "format": 1,
        "version": f"{created:%Y%m%d-%H%M%S}-{train_report['run_id'][:8]}",
        "model_name": cfg.deploy.model_name,
        "model": dict(module.hparams.model),
        "label_names": list(module.hparams.label_names),
        "max_length": profile["max_length"],
        "pad_id": pad_id,
        "inputs": ["input_ids", "attention_mask"],
        "outputs": ["logits"],
        "files": {**MODEL_FILES, "tokenizer": "tokenizer.json"},
        "metrics": {k: v for k, v in metrics.items() if k != "confusion_matrix"},
        "gate": {"blessed": verdict["blessed"], "reasons": verdict["reasons"]},
        "lineage": {
            "data": profile["data"]["name"],
            "data_hash": profile["data"]["content_hash"],
            "git_commit": git_commit(),
            "mlflow_run_id": train_report["run_id"],
        },
        "created_at": created.isoformat(timespec="seconds"),
        "profile": profile,
    }


def model_card(meta: dict) -> str:
    m = meta["metrics"]
    classes = ", ".join(meta["label_names"])
    per_class = "\n".join(
        f"| {name} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
        for name, v in m["per_class"].items()
    )
    splits = meta["profile"]["splits"]
    return f"""# Model card: {meta['model_name']} {meta['version']}

## Model
A `{meta['model']['name']}` text classifier over {len(meta['label_names'])} classes
({classes}), exported to ONNX (fp32 and static int8). Input: up to {meta['max_length']}
tokens; longer texts are truncated.

## Data
`{meta['lineage']['data']}` (content hash `{meta['lineage']['data_hash'][:16]}`): train
{splits['train']['rows']} rows, validation {splits['val']['rows']}, test {splits['test']['rows']}.
Text is NFKC-normalised, HTML is stripped, e-mail addresses, URLs and phone numbers are
replaced by placeholders before tokenization, in training and in serving alike.

## Metrics (test split)
accuracy {m['accuracy']:.4f}, macro F1 {m['f1_macro']:.4f}, ROC-AUC {m['roc_auc']:.4f},
PR-AUC {m['pr_auc']:.4f}, expected calibration error {m['ece']:.4f}.

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{per_class}

Gate: {'blessed' if meta['gate']['blessed'] else 'not blessed'}.
{chr(10).join('- ' + r for r in meta['gate']['reasons'])}

## Intended use
Classifying short English texts like those in the training data, with a person
or a downstream check able to act on a wrong answer.

## Limitations
- Scores are only as good as the training data is representative: texts unlike it
  (other languages, domains, much longer texts) get confident answers that may be wrong;
  the service's drift metrics show when live traffic moves away from the training profile.
- Masking of personal data is pattern-based and does not catch every form.
- The data sets' own licences and biases carry over (see data/external/*/SOURCE.md).

## Lineage
MLflow run `{meta['lineage']['mlflow_run_id']}`, git commit `{meta['lineage']['git_commit']}`,
created {meta['created_at']}.
"""


def build_bundle(cfg: DictConfig, out_dir: Path = CANDIDATE_BUNDLE,
                 checkpoint: Path = BEST_CHECKPOINT,
                 processed_dir: Path = PROCESSED_DIR) -> dict:
    """Export, quantise, check and write the bundle atomically. Returns bundle.json."""
    module = load_module(checkpoint)
    pad_id = module.hparams.pad_id
    splits = load_splits(processed_dir)
    profile = atomic.read_json(processed_dir / "profile.json")
    meta = bundle_meta(cfg, module, atomic.read_json(TRAIN_REPORT),
                       atomic.read_json(METRICS_FILE), atomic.read_json(GATE_FILE),
                       profile, pad_id)
    with atomic.atomic_dir(out_dir) as tmp:
        export_onnx(module.model, tmp / MODEL_FILES["fp32"], cfg.deploy.opset, pad_id)
        int8 = quantize_best(tmp / MODEL_FILES["fp32"], tmp / MODEL_FILES["int8"], module,
                             column(splits["val"], "input_ids"), cfg)
        shutil.copy2(processed_dir / "tokenizer.json", tmp / "tokenizer.json")
        atomic.write_json(tmp / "bundle.json", meta)
        test = splits["test"]
        meta["parity"] = check_parity(tmp, module, column(test, "text"),
                                      column(test, "input_ids"), cfg)
        meta["int8"] = int8
        atomic.write_json(tmp / "bundle.json", meta)
        atomic.write_text(tmp / "MODEL_CARD.md", model_card(meta))
    return meta


# ---------------------------------------------------------------- registry


def register(bundle_dir: Path, meta: dict) -> str:
    """Log the bundle as a pyfunc model in the training run; returns the version."""
    serving_dir = Path(__file__).resolve().parent.parent / "serving"
    example = pd.DataFrame({"text": ["a charming and often affecting journey"]})
    bundle = Bundle.load(bundle_dir, "fp32")
    probs = bundle.predict_proba(example["text"].tolist())
    output = pd.DataFrame({"label": [bundle.label_names[int(probs[0].argmax())]],
                           "score": [float(probs[0].max())],
                           **{f"p_{n}": [float(p)] for n, p in zip(bundle.label_names, probs[0],
                                                                   strict=True)}})
    with tempfile.TemporaryDirectory() as tmp, \
            mlflow.start_run(run_id=meta["lineage"]["mlflow_run_id"]):
        # MLflow names the artifact after the directory: make it `artifacts/bundle`.
        staged = shutil.copytree(bundle_dir, Path(tmp) / "bundle")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(serving_dir / "pyfunc.py"),
            artifacts={"bundle": str(staged)},
            code_paths=[str(serving_dir)],
            signature=infer_signature(example, output),
            input_example=example,
            pip_requirements=SERVE_REQUIREMENTS,
            registered_model_name=meta["model_name"],
        )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    tags = {
        "bundle_version": meta["version"],
        "blessed": str(meta["gate"]["blessed"]).lower(),
        "gate_reasons": " | ".join(meta["gate"]["reasons"])[:5000],
        "data_hash": meta["lineage"]["data_hash"],
        "git_commit": meta["lineage"]["git_commit"],
        "accuracy": f"{meta['metrics']['accuracy']:.4f}",
    }
    for key, value in tags.items():
        client.set_model_version_tag(meta["model_name"], version, key, value)
    return version


def store_bundle(bundle_dir: Path, version: str, store: Path = BUNDLE_STORE) -> Path:
    """Copy a bundle into the store as `<store>/<registry version>`, atomically."""
    target = store / version
    if not target.exists():
        with atomic.atomic_dir(target) as tmp:
            shutil.copytree(bundle_dir, tmp, dirs_exist_ok=True)
    return target


def point_current(target: Path, current: Path = CURRENT_BUNDLE) -> None:
    """Swap the `current` symlink in one rename: readers see the old or the new."""
    current.parent.mkdir(parents=True, exist_ok=True)
    link = current.with_name(f".{current.name}.tmp-{os.getpid()}")
    link.unlink(missing_ok=True)
    link.symlink_to(os.path.relpath(target.resolve(), current.parent.resolve()))
    os.replace(link, current)


def promote(model_name: str, version: str, bundle_dir: Path,
            store: Path = BUNDLE_STORE, current: Path = CURRENT_BUNDLE) -> Path:
    """Make `version` the champion and the current bundle."""
    target = store_bundle(bundle_dir, version, store)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(model_name, CHAMPION, version)
    client.set_model_version_tag(model_name, version, "promoted_at",
                                 dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    point_current(target, current)
    return target


def rollback(model_name: str, store: Path = BUNDLE_STORE,
             current: Path = CURRENT_BUNDLE) -> str:
    """Return champion and current to the blessed version before the champion."""
    client = mlflow.MlflowClient()
    try:
        champion = int(client.get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException:
        raise DeployError(f"{model_name} has no champion to roll back from") from None
    earlier = [
        int(v.version)
        for v in client.search_model_versions(f"name = '{model_name}'")
        if v.tags.get("blessed") == "true" and int(v.version) < champion
    ]
    if not earlier:
        raise DeployError(f"{model_name} v{champion} is the first blessed version")
    previous = str(max(earlier))
    client.set_model_version_tag(model_name, str(champion), "rolled_back", "true")
    target = store / previous
    if not target.exists():
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{model_name}/{previous}", dst_path=tmp
            )
            store_bundle(Path(local) / "artifacts" / "bundle", previous, store)
    client.set_registered_model_alias(model_name, CHAMPION, previous)
    point_current(target, current)
    return previous


def prune_store(model_name: str, keep: int, store: Path = BUNDLE_STORE) -> None:
    """Keep the newest `keep` bundles on disk; older ones stay in the registry."""
    if not store.exists():
        return
    live = Path(os.path.realpath(CURRENT_BUNDLE)).name if CURRENT_BUNDLE.exists() else None
    versions = sorted((p for p in store.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    for old in versions[:-keep]:
        if old.name != live:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- the stage


def deploy(cfg: DictConfig) -> dict:
    mlflow.set_tracking_uri(tracking_uri(cfg))
    meta = build_bundle(cfg)
    version = register(CANDIDATE_BUNDLE, meta)
    blessed = meta["gate"]["blessed"]
    if blessed:
        promote(meta["model_name"], version, CANDIDATE_BUNDLE)
        prune_store(meta["model_name"], cfg.deploy.keep_bundles)
    report = {
        "model_name": meta["model_name"],
        "registry_version": version,
        "bundle_version": meta["version"],
        "blessed": blessed,
        "promoted": blessed,
        "reasons": meta["gate"]["reasons"],
        "parity": meta["parity"],
    }
    atomic.write_json(DEPLOY_REPORT, report)
    return report


def main() -> None:
    cfg = load_params()
    try:
        if sys.argv[1:] == ["rollback"]:
            mlflow.set_tracking_uri(tracking_uri(cfg))
            version = rollback(cfg.deploy.model_name)
            print(f"rollback: {cfg.deploy.model_name} champion is now v{version}; "
                  f"{CURRENT_BUNDLE} -> {os.readlink(CURRENT_BUNDLE)}")
            return
        report = deploy(cfg)
    except DeployError as err:
        sys.exit(f"deploy: {err}")
    p = report["parity"]
    print(f"deploy: {report['model_name']} v{report['registry_version']} "
          f"(bundle {report['bundle_version']}): "
          f"{'promoted to champion' if report['promoted'] else 'registered, NOT promoted'}; "
          f"fp32 max |diff| {p['fp32_max_abs_diff']:.1e}, "
          f"int8 agreement {p['int8_label_agreement']:.4f}")


if __name__ == "__main__":
    main()
