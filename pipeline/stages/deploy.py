"""deploy: the stage that turns the best checkpoint into a checked, registered bundle.

1. Export to ONNX, fp32 and static int8 (the task's export, e.g.
   pipeline/tasks/text_classification/export.py).
2. Parity checks on the test split, sent as a client sends it (texts; images as PNG
   files), fail the stage: the saved preprocessing (tokenizer.json, image_spec.json)
   reproduces the inputs training saw; fp32 ONNX logits match PyTorch within
   `fp32_max_abs_diff`; int8 labels agree with PyTorch on at least
   `int8_min_agreement` of rows; an item's logits alone match its logits inside a
   batch (fp32 within `fp32_max_abs_diff`, int8 within `int8_batch_max_abs_diff`).
3. The bundle (`models/candidate/`): both models, the task's preprocessing files,
   bundle.json and MODEL_CARD.md, written atomically.
4. A signed copy of it (model.sig, OpenSSF model signing with `deploy.signing_key`,
   made on the first deploy: pipeline/tracking/signing.py) as a new version of the
   registered pyfunc model, tagged with the gate's verdict
   (pipeline/tracking/registry.py). Only a blessed version gets the `champion` alias and
   becomes `models/current` (or, with `deploy.promote_to: challenger` and a champion
   already there, the `challenger` alias, to prove itself on production labels). The
   candidate itself stays unsigned, so that every clone writes the same bytes.

Rollback and promotion by hand: `textops rollback`, `textops promote VERSION`.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

import mlflow
import onnxruntime as ort
from omegaconf import DictConfig

from pipeline import atomic, logs, tasks
from pipeline.config import Paths, git_commit, load_params, tracking_uri
from pipeline.data.splits import load_splits
from pipeline.tasks.parity import DeployError
from pipeline.tracking import audit, lineage, privacy, signing
from pipeline.tracking.challenger import set_challenger
from pipeline.tracking.registry import alias_version, promote, prune_store, register
from serving.bundle import MODEL_FILES, RuntimeOptions
from serving.bundle.tasks import signature

# ---------------------------------------------------------------- the bundle


def bundle_meta(cfg: DictConfig, module, version: str, checkpoint_sha256: str, metrics: dict,
                verdict: dict, profile: dict, model_signature: dict) -> dict:
    """bundle.json. Everything in it follows from the code, data and parameters, so the
    same training gives the same bundle, byte for byte; the registry version, the
    MLflow run and the git commit are recorded by the registry (`registry.json` beside
    a promoted bundle)."""
    task = tasks.from_config(cfg)
    own = task.bundle_fields(cfg, module, profile)
    return {
        "format": 2,  # 2: names its task and signature (1: "inputs", "outputs")
        "task": task.name,
        "signature": model_signature,
        "version": version,
        "model_name": cfg.deploy.model_name,
        "model": dict(module.hparams.model),
        "label_names": list(module.hparams.label_names),
        **{key: value for key, value in own.items() if key != "files"},
        "files": {**MODEL_FILES, **own["files"]},
        "metrics": {k: v for k, v in metrics.items() if k != "confusion_matrix"},
        "gate": {"blessed": verdict["blessed"], "reasons": verdict["reasons"]},
        "lineage": {
            "data": profile["data"]["name"],
            "data_hash": profile["data"]["content_hash"],
            "checkpoint_sha256": checkpoint_sha256,
        },
        "profile": profile,
    }


def content_version(bundle_dir: Path, preprocessing: tuple[str, ...]) -> str:
    """The bundle's version: a digest of its model files and the preprocessing that
    feeds them (for text, tokenizer.json), so a version names exactly one set of
    answers."""
    files = [bundle_dir / name for name in (*MODEL_FILES.values(), *preprocessing)]
    return hashlib.sha256("".join(lineage.digest(f) for f in files).encode()).hexdigest()[:16]


def model_card(meta: dict) -> str:
    task = tasks.get(meta["task"])
    model, inputs, use = task.card_text(meta)
    splits = meta["profile"]["splits"]
    return f"""# Model card: {meta['model_name']} {meta['version']}

## Model
{model}

## Data
`{meta['lineage']['data']}` (content hash `{meta['lineage']['data_hash'][:16]}`): train
{splits['train']['rows']} rows, validation {splits['val']['rows']}, test {splits['test']['rows']}.
{inputs}

## Metrics (test split)
{task.scoring().card(meta['metrics'])}

Gate: {'blessed' if meta['gate']['blessed'] else 'not blessed'}.
{chr(10).join('- ' + r for r in meta['gate']['reasons'])}

## Privacy
{privacy.describe(meta['metrics'].get('privacy'))}\
{privacy.describe_federated(meta['metrics'].get('federated'))}

## Intended use
{use}

## Limitations
- Scores are only as good as the training data is representative: texts unlike it
  (other languages, domains or kinds of picture) get confident answers that may be wrong;
  the service's drift metrics show when live traffic moves away from the training profile.
- The data sets' own licences and biases carry over (see data/external/*/SOURCE.md).

## Lineage
Best checkpoint sha256 `{meta['lineage']['checkpoint_sha256'][:16]}` (its MLflow run carries
the tag `checkpoint_sha256`; the registry version, with the git commit it was deployed
from, carries `bundle_version` {meta['version']}).
"""


def build_bundle(cfg: DictConfig, paths: Paths) -> dict:
    """Export, quantise, check and write the bundle to `paths.candidate` atomically.
    Returns bundle.json."""
    task = tasks.from_config(cfg)
    module = task.load_module(paths.checkpoint)
    splits = load_splits(paths.processed)
    profile = atomic.read_json(paths.processed / "profile.json")
    with atomic.atomic_dir(paths.candidate) as tmp:
        task.export(module, tmp / MODEL_FILES["fp32"], cfg.deploy.opset)
        int8 = task.quantize(tmp / MODEL_FILES["fp32"], tmp / MODEL_FILES["int8"], module,
                             splits["val"], paths, cfg)
        for name in task.spec.preprocessing:  # what turns a request into model inputs
            shutil.copy2(paths.processed / name, tmp / name)
        model_signature = signature(ort.InferenceSession(
            str(tmp / MODEL_FILES["fp32"]), RuntimeOptions().session_options(),
            providers=["CPUExecutionProvider"]))
        meta = bundle_meta(cfg, module, content_version(tmp, task.spec.preprocessing),
                           lineage.digest(paths.checkpoint),
                           atomic.read_json(paths.metrics), atomic.read_json(paths.gate),
                           profile, model_signature)
        atomic.write_json(tmp / "bundle.json", meta)
        test = splits["test"]
        meta["parity"] = task.check_bundle(tmp, module, test, paths, cfg)
        meta["int8"] = int8
        if measured := task.drift_reference(tmp, paths, cfg):
            profile["reference"] = {**profile.get("reference", {}), **measured}
        atomic.write_json(tmp / "bundle.json", meta)
        atomic.write_text(tmp / "MODEL_CARD.md", model_card(meta))
    return meta


# ---------------------------------------------------------------- the stage


def deploy(cfg: DictConfig, paths: Paths) -> dict:
    """Build, register and (when blessed) promote. Writes the report (what the inputs
    determine) and the run's facts (the registry version and run it got); returns both."""
    mlflow.set_tracking_uri(tracking_uri(cfg))
    private_key, public_key = signing.key_paths(cfg, paths)
    if signing.ensure_key_pair(private_key, public_key):
        print(f"deploy: made a signing key pair, {private_key} and {public_key} "
              "(services verify bundles with the .pub)")
    meta = build_bundle(cfg, paths)
    run_id = lineage.training_run(cfg.mlflow.experiment, paths.checkpoint)
    blessed = meta["gate"]["blessed"]
    with tempfile.TemporaryDirectory() as tmp:
        signed = signing.signed_copy(paths.candidate, Path(tmp) / "bundle", private_key)
        version = register(signed, meta, run_id)
        reason = ("blessed by the gate: " + "; ".join(meta["gate"]["reasons"]))[:500]
        challenging = blessed and cfg.deploy.get("promote_to") == "challenger" and \
            alias_version(mlflow.MlflowClient(), meta["model_name"]) is not None
        if challenging:
            set_challenger(meta["model_name"], version, audit.actor("deploy"), reason)
        elif blessed:
            promote(meta["model_name"], version, signed, paths, kind="deploy", reason=reason)
            prune_store(cfg.deploy.keep_bundles, paths)
    report = {
        "model_name": meta["model_name"],
        "bundle_version": meta["version"],
        "blessed": blessed,
        "promoted": blessed and not challenging,
        "reasons": meta["gate"]["reasons"],
        "parity": meta["parity"],
    }
    # the registry's state, which other runs change: a fact of this run, not an output
    facts = {"registry_version": version, "mlflow_run_id": run_id, "git_commit": git_commit(),
             "challenger": challenging}
    atomic.write_json(paths.deploy_report, report)
    atomic.write_json(paths.run_facts("deploy"), facts)
    return {**report, **facts}


def main() -> None:
    logs.quiet()
    cfg = load_params()
    try:
        report = deploy(cfg, Paths())
    except (DeployError, signing.SigningKeyError) as err:
        sys.exit(f"deploy: {err}")
    p = report["parity"]
    became = ("promoted to champion" if report["promoted"] else
              "made the challenger (textops decide promotes or retires it)"
              if report["challenger"] else "registered, NOT promoted")
    print(f"deploy: {report['model_name']} v{report['registry_version']} "
          f"(bundle {report['bundle_version']}): {became}; "
          f"fp32 max |diff| {p['fp32_max_abs_diff']:.1e}, "
          f"int8 agreement {p.get('int8_label_agreement', p.get('int8_top1_agreement')):.4f}")


if __name__ == "__main__":
    main()
