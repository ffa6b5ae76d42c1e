"""The training loop every task shares: fit the task's module with PyTorch Lightning,
tracked in MLflow, resumable.

Checkpoints are written to a work directory (`Paths.train_work`) while training runs.
If a run is killed, the next run with the same configuration and data resumes from its
last checkpoint, in the same MLflow run. When training ends, the best and last
checkpoints are moved to `Paths.checkpoints` in one atomic step and the work directory
is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
)
from pytorch_lightning.loggers import MLFlowLogger

from pipeline import atomic, tasks
from pipeline.config import PARAMS_FILE, Paths, git_commit, tracking_uri
from pipeline.modeling import privacy
from pipeline.modeling.callbacks import EpochSummary, MovingAverage, Progress, TrainingCurves
from pipeline.reporting import sources
from pipeline.tracking import lineage
from pipeline.tracking import privacy as privacy_record


def fingerprint(cfg: DictConfig, processed_dir: Path, preprocessing: tuple[str, ...],
                transfer: Path | None = None) -> str:
    """What a resumable run must share with the run it resumes: the configuration and
    the processed data itself (its split and vocabulary, not only the raw rows), and
    the transfer set it learns from, if any."""
    relevant = {k: OmegaConf.to_container(cfg[k]) for k in ("model", "train", "trainer")}
    relevant["seed"] = cfg.seed
    relevant["data"] = [lineage.digest(processed_dir / name)
                        for name in ("profile.json", *preprocessing)]
    if transfer is not None:
        relevant["transfer"] = [lineage.digest(transfer.parent / "transfer.json"),
                                cfg.distill.weight]
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def prepare_work_dir(work_dir: Path, key: str) -> tuple[Path | None, str | None, dict | None]:
    """The checkpoint, MLflow run and position to resume, if an interrupted run with
    the same configuration and data left them; otherwise a clean work directory."""
    state_file, last = work_dir / "state.json", work_dir / "last.ckpt"
    if state_file.exists() and last.exists():
        state = atomic.read_json(state_file)
        try:
            saved = torch.load(last, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - killed while writing it: start over
            saved = None
        if state.get("fingerprint") == key and saved is not None:
            position = {"epoch": saved["epoch"], "global_step": saved["global_step"]}
            return last, state.get("run_id"), position
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    return None, None, None


def on_terminal() -> bool:
    """Someone watches: the stage's stderr is a terminal (dvc repro passes its own on)."""
    return sys.stderr.isatty()


def monitor_mode(monitor: str) -> str:
    """Whether the monitored metric is better lower (a loss) or higher."""
    return "min" if monitor.endswith("loss") else "max"


def trainer_options(cfg: DictConfig) -> dict:
    """`trainer`'s Lightning options (a federated trainer's own settings aside)."""
    options = OmegaConf.to_container(cfg.trainer)
    options.pop("federated", None)
    return options


def build_trainer(cfg: DictConfig, logger: MLFlowLogger, work_dir: Path,
                  extra_callbacks: list[Callback] = ()) -> pl.Trainer:
    monitor = cfg.train.monitor
    mode = monitor_mode(monitor)
    callbacks = [
        ModelCheckpoint(
            dirpath=work_dir, filename="best", monitor=monitor, mode=mode, save_top_k=1,
            save_last=True,
        ),
        EarlyStopping(monitor=monitor, mode=mode, patience=cfg.train.patience),
        LearningRateMonitor(logging_interval="epoch"),
        EpochSummary(),
        # a bar on a terminal; in a log (CI, a pod), a line with rate and ETA every 30 s
        TQDMProgressBar() if on_terminal() else Progress(),
        *extra_callbacks,
    ]
    if cfg.train.get("ema_decay"):
        callbacks.append(MovingAverage(cfg.train.ema_decay))
    return pl.Trainer(
        **trainer_options(cfg),
        max_epochs=cfg.train.max_epochs,
        limit_train_batches=cfg.train.limit_train_batches,
        # a private fit clips each example's gradient instead (privacy.py)
        gradient_clip_val=None if privacy.enabled(cfg) else cfg.train.gradient_clip_val,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=work_dir,
        enable_progress_bar=on_terminal(),
        enable_model_summary=False,
        log_every_n_steps=50,
    )


def mlflow_logger(cfg: DictConfig, data_hash: str, run_id: str | None = None,
                  tags: dict | None = None) -> MLFlowLogger:
    """The training run's MLflow run (`run_id`: one a killed fit left, to go on in)."""
    return MLFlowLogger(
        experiment_name=cfg.mlflow.experiment,
        run_name=f"{cfg.data.name}-{cfg.model.name}",
        tracking_uri=tracking_uri(cfg),
        run_id=run_id,
        tags={"git_commit": git_commit(), "data_hash": data_hash, "data": cfg.data.name,
              **(tags or {})},
    )


def fit(
    cfg: DictConfig,
    paths: Paths,
    callbacks: list[Callback] = (),
    tags: dict | None = None,
    transfer: Path | None = None,
    start_from: dict | None = None,
) -> dict | None:
    """Train; on rank 0 return (and write) the report, on other ranks return None.

    `callbacks` join the trainer's; `tags` join the MLflow run's (hyperparameter
    search nests its trials under a parent run this way)."""
    pl.seed_everything(cfg.seed, workers=True)
    task, work_dir = tasks.from_config(cfg), paths.train_work
    profile = atomic.read_json(paths.processed / "profile.json")
    data_hash = profile["data"]["content_hash"]
    key = fingerprint(cfg, paths.processed, task.spec.preprocessing, transfer)
    resume_from, run_id, position = prepare_work_dir(work_dir, key)

    logger = mlflow_logger(cfg, data_hash, run_id, tags)
    curves = TrainingCurves(paths.train_curves, paths.train_curves_image)
    datamodule = task.datamodule(cfg, paths, transfer)
    fed = datamodule
    if privacy.enabled(cfg):  # DP-SGD: Poisson-sampled batches, clipped noisy steps
        privacy.check_settings(cfg, distilling=transfer is not None)
        fed = privacy.PoissonSampling(datamodule)
        callbacks = [*callbacks, privacy.DifferentialPrivacy(
            cfg.train.privacy, cfg.train.max_epochs, privacy.public_parts(cfg))]
    trainer = build_trainer(cfg, logger, work_dir, [*callbacks, curves])
    module = task.module(cfg, paths, distilling=transfer is not None)
    if transfer is not None:
        print(f"train: distilling from the transfer set {transfer} (loss: "
              f"{cfg.distill.weight} x logit MSE + {1 - cfg.distill.weight:g} x "
              "cross-entropy on labelled rows)", flush=True)
    if start_from is not None and resume_from is None:  # a pruned model, fine-tuned
        module.model.load_state_dict(start_from)
    elif resume_from is None:
        task.warm_start(module, cfg, paths)
    if trainer.is_global_zero:
        logger.log_hyperparams(OmegaConf.to_container(cfg))
        atomic.write_json(
            work_dir / "state.json",
            {"fingerprint": key, "run_id": logger.run_id},
        )

    started = time.perf_counter()
    trainer.fit(module, datamodule=fed, ckpt_path=resume_from)
    seconds = time.perf_counter() - started
    if not trainer.is_global_zero:
        return None
    # a private fit's whole spend: the weights kept were chosen after every epoch ran
    spent = next((c.state_dict() for c in trainer.callbacks
                  if getattr(c, "state_key", None) == privacy_record.STATE_KEY), None)
    checkpoint = trainer.checkpoint_callback
    outcome = {"best_path": Path(checkpoint.best_model_path),
               "best_score": float(checkpoint.best_model_score),
               "epochs": trainer.current_epoch, "global_step": trainer.global_step,
               "stopped_early": trainer.early_stopping_callback.stopped_epoch > 0}
    resumed = {"from": resume_from, "at": position}
    return finish(cfg, logger, paths, outcome, len(datamodule.rows["train"]), seconds,
                  resumed, spent)


def portable_copy(source: Path, target: Path, root: Path, privacy_state: dict | None = None
                  ) -> None:
    """Copy a checkpoint with the absolute paths that ModelCheckpoint records in it
    (its directory, the best model's path) made relative to `root`, the repository,
    so the same training gives the same bytes in any clone. `privacy_state`: the whole
    fit's privacy record, in place of the one saved with the checkpoint (a best
    checkpoint is chosen after later epochs ran, so it owes their epsilon too)."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    if privacy_state is not None:
        checkpoint["callbacks"][privacy_record.STATE_KEY] = privacy_state
    for state in checkpoint.get("callbacks", {}).values():
        for key, value in state.items():
            if isinstance(value, str) and os.path.isabs(value):
                state[key] = os.path.relpath(value, root)
        if "best_k_models" in state:
            state["best_k_models"] = {os.path.relpath(k, root): v
                                      for k, v in state["best_k_models"].items()}
    torch.save(checkpoint, target)


def finish(cfg: DictConfig, logger: MLFlowLogger, paths: Paths, outcome: dict,
           train_rows: int, seconds: float, resumed: dict, spent: dict | None = None) -> dict:
    """Move the checkpoints into place, log and tag them, and write the report and the
    run's facts (rank 0). Returns both in one dict. `outcome`: the best checkpoint's
    path and score, epochs, optimizer steps, whether it stopped early, and anything
    else the report carries (a federated run's rounds)."""
    work_dir = paths.train_work
    with atomic.atomic_dir(paths.checkpoint.parent) as tmp:
        root = paths.root.resolve()
        portable_copy(outcome["best_path"], tmp / "best.ckpt", root, spent)
        portable_copy(work_dir / "last.ckpt", tmp / "last.ckpt", root, spent)
    best = paths.checkpoint
    run = logger.experiment
    run.log_artifact(logger.run_id, str(best), "checkpoints")
    run.set_tag(logger.run_id, lineage.CHECKPOINT_TAG, lineage.digest(best))
    if (paths.root / PARAMS_FILE).exists():
        run.log_artifact(logger.run_id, str(paths.root / PARAMS_FILE))
    # the data profile trained on, for the run's report (pipeline/reporting/)
    run.log_artifact(logger.run_id, str(paths.processed / "profile.json"), sources.TRAINING)
    extra = {key: value for key, value in outcome.items()
             if key not in ("best_path", "best_score", "epochs", "global_step",
                            "stopped_early")}
    report = {
        "monitor": cfg.train.monitor,
        "best_score": outcome["best_score"],
        "best_checkpoint": str(best),
        "epochs": outcome["epochs"],
        "global_step": outcome["global_step"],
        "stopped_early": outcome["stopped_early"],
        "train_rows": train_rows,
        **extra,
    }
    if (record := privacy_record.spent(paths.checkpoint)) is not None:
        report["privacy"] = record  # what the whole fit spent
    facts = {
        "run_id": logger.run_id,
        "experiment_id": logger.experiment_id,
        "resumed_from": str(resumed["from"]) if resumed["from"] else None,
        "resumed_at": resumed["at"],
        "wall_time_s": round(seconds, 1),
        # Optimizer steps x batch size over the whole fit, validation included.
        "sequences_per_s": round(outcome["global_step"] * cfg.train.batch_size / seconds, 1),
    }
    for name in ("wall_time_s", "sequences_per_s"):
        run.log_metric(logger.run_id, name, facts[name])
    atomic.write_json(paths.train_report, report)
    atomic.write_json(paths.train_facts, facts)
    shutil.rmtree(work_dir, ignore_errors=True)
    return {**report, **facts}
