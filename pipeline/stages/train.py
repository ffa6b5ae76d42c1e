"""train: fit the configured model with PyTorch Lightning, tracked in MLflow.

Checkpoints are written to a work directory (`models/train-work/`) while training
runs. If a run is killed, the next run with the same configuration and data resumes
from its last checkpoint, in the same MLflow run. When training ends, the best and
last checkpoints are moved to `models/checkpoints/` in one atomic step and the work
directory is removed.

Output: `models/checkpoints/{best,last}.ckpt` and `reports/train.json` (best score,
epochs, steps: what the code, data and parameters determine, the same bytes in every
run on one CPU); `reports/runs/train.json` (this run's MLflow run id, wall time and
throughput, which DVC does not track); an MLflow run with every resolved parameter,
the per-epoch curves, the git commit, the data hash, and the best checkpoint, tagged
with the checkpoint's sha256 (`pipeline.tracking.lineage`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
    WeightAveraging,
)
from pytorch_lightning.loggers import MLFlowLogger
from tokenizers import Tokenizer
from torch.optim.swa_utils import get_ema_multi_avg_fn

from pipeline import atomic

from pipeline.tracking import lineage
from pipeline.modeling.classifier import TextClassifier
from pipeline.config import (
    CHECKPOINT_DIR,
    PARAMS_FILE,
    PROCESSED_DIR,
    TRAIN_REPORT,
    TRANSFER_DIR,
    git_commit,
    load_params,
    tracking_uri,
)
from pipeline.modeling.datamodule import TextDataModule
from pipeline.tasks.text_classification.tokenizer import PAD

WORK_DIR = Path("models/train-work")
RUN_FACTS = Path("reports/runs/train.json")


class EpochSummary(Callback):
    """One line per epoch on stdout, since the progress bar is off in stage logs.

    Printed when the next epoch starts or training ends: Lightning calls callbacks'
    on_train_epoch_end before the LightningModule's, which logs the training metrics.
    """

    def __init__(self):
        self.finished_epoch: int | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        self.finished_epoch = trainer.current_epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._print(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        self._print(trainer)

    def _print(self, trainer: pl.Trainer) -> None:
        if self.finished_epoch is None or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        shown = "  ".join(f"{k} {float(metrics[k]):.4f}" for k in
                          ("train_loss", "train_acc", "val_loss", "val_acc", "val_f1")
                          if k in metrics)
        print(f"epoch {self.finished_epoch + 1}/{trainer.max_epochs}: {shown}", flush=True)
        self.finished_epoch = None


class Progress(Callback):
    """A line every `every_s` seconds while an epoch trains: step, rate and the time
    left, so a long epoch (a MiniLM epoch takes ~26 minutes on 2 CPU cores) is never
    silent in a stage log or CI."""

    def __init__(self, every_s: float = 30.0):
        self.every_s = every_s
        self.started = self.last = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        self.started = self.last = time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch,
                           batch_idx: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s or not trainer.is_global_zero:
            return
        self.last = now
        done, total = batch_idx + 1, trainer.num_training_batches
        rate = done / (now - self.started)
        left = (total - done) / rate if rate else float("inf")
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: batch {done}/{total} "
              f"({done / total:.0%}), {rate * len(batch['labels']):.0f} sequences/s, "
              f"epoch ends in {left / 60:.1f} min", flush=True)


class MovingAverage(WeightAveraging):
    """An exponential moving average of the weights, updated after every optimizer
    step, that validation, the checkpoints and so the shipped model see.

    Kept on the device that trains: Lightning sets callbacks up before the strategy
    moves the model there, so the parent class would keep it on the CPU and copy every
    weight across after each GPU step."""

    def __init__(self, decay: float):
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay))

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        self._device = trainer.strategy.root_device
        super().setup(trainer, pl_module, stage)


def transfer_set(transfer_dir: Path = TRANSFER_DIR) -> Path | None:
    """The transfer set to train on, when the transfer stage wrote one (a teacher is
    configured); None: train on the labelled training split."""
    dataset = transfer_dir / "dataset"
    return dataset if dataset.is_dir() else None


def fingerprint(cfg: DictConfig, processed_dir: Path, transfer: Path | None = None) -> str:
    """What a resumable run must share with the run it resumes: the configuration and
    the processed data itself (its split and vocabulary, not only the raw rows), and
    the transfer set it learns from, if any."""
    relevant = {k: OmegaConf.to_container(cfg[k]) for k in ("model", "train", "trainer")}
    relevant["seed"] = cfg.seed
    relevant["data"] = [lineage.digest(processed_dir / name)
                        for name in ("profile.json", "tokenizer.json")]
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


def build_module(cfg: DictConfig, tokenizer: Tokenizer, profile: dict,
                 distilling: bool = False) -> TextClassifier:
    return TextClassifier(
        model=OmegaConf.to_container(cfg.model),
        vocab_size=tokenizer.get_vocab_size(),
        num_classes=len(profile["label_names"]),
        max_length=profile["max_length"],
        pad_id=tokenizer.token_to_id(PAD),
        label_names=profile["label_names"],
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        warmup_ratio=cfg.train.warmup_ratio,
        label_smoothing=cfg.train.label_smoothing,
        distill_weight=cfg.distill.weight if distilling else 0.0,
    )


def build_trainer(cfg: DictConfig, logger: MLFlowLogger, work_dir: Path,
                  extra_callbacks: list[Callback] = ()) -> pl.Trainer:
    monitor = cfg.train.monitor
    mode = "min" if monitor.endswith("loss") else "max"
    callbacks = [
        ModelCheckpoint(
            dirpath=work_dir, filename="best", monitor=monitor, mode=mode, save_top_k=1,
            save_last=True,
        ),
        EarlyStopping(monitor=monitor, mode=mode, patience=cfg.train.patience),
        LearningRateMonitor(logging_interval="epoch"),
        EpochSummary(),
        Progress(),
        *extra_callbacks,
    ]
    if cfg.train.get("ema_decay"):
        callbacks.append(MovingAverage(cfg.train.ema_decay))
    return pl.Trainer(
        **OmegaConf.to_container(cfg.trainer),
        max_epochs=cfg.train.max_epochs,
        limit_train_batches=cfg.train.limit_train_batches,
        gradient_clip_val=cfg.train.gradient_clip_val,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=work_dir,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
    )


def fit(
    cfg: DictConfig,
    processed_dir: Path = PROCESSED_DIR,
    checkpoint_dir: Path = CHECKPOINT_DIR,
    report_path: Path = TRAIN_REPORT,
    work_dir: Path = WORK_DIR,
    run_facts_path: Path = RUN_FACTS,
    callbacks: list[Callback] = (),
    tags: dict | None = None,
    transfer: Path | None = None,
    start_from: dict | None = None,
) -> dict | None:
    """Train; on rank 0 return (and write) the report, on other ranks return None.

    `callbacks` join the trainer's; `tags` join the MLflow run's (hyperparameter
    search nests its trials under a parent run this way)."""
    pl.seed_everything(cfg.seed, workers=True)
    tokenizer = Tokenizer.from_file(str(processed_dir / "tokenizer.json"))
    profile = atomic.read_json(processed_dir / "profile.json")
    data_hash = profile["data"]["content_hash"]
    key = fingerprint(cfg, processed_dir, transfer)
    resume_from, run_id, position = prepare_work_dir(work_dir, key)

    logger = MLFlowLogger(
        experiment_name=cfg.mlflow.experiment,
        run_name=f"{cfg.data.name}-{cfg.model.name}",
        tracking_uri=tracking_uri(cfg),
        run_id=run_id,
        tags={"git_commit": git_commit(), "data_hash": data_hash, "data": cfg.data.name,
              **(tags or {})},
    )
    trainer = build_trainer(cfg, logger, work_dir, callbacks)
    datamodule = TextDataModule(
        pad_id=tokenizer.token_to_id(PAD),
        batch_size=cfg.train.batch_size,
        seed=cfg.seed,
        num_workers=cfg.train.num_workers,
        processed_dir=processed_dir,
        transfer=transfer,
    )
    module = build_module(cfg, tokenizer, profile, distilling=transfer is not None)
    if transfer is not None:
        print(f"train: distilling from the transfer set {transfer} (loss: "
              f"{cfg.distill.weight} x logit MSE + {1 - cfg.distill.weight:g} x "
              "cross-entropy on labelled rows)", flush=True)
    if start_from is not None and resume_from is None:  # a pruned model, fine-tuned
        module.model.load_state_dict(start_from)
    elif cfg.train.get("init_embeddings") and resume_from is None:
        from pipeline.tasks.text_classification.models.pretrained import init_token_embeddings

        explained = init_token_embeddings(module.model.embedding, tokenizer.get_vocab(),
                                          cfg.train.init_embeddings)
        print(f"train: token embeddings from {cfg.train.init_embeddings}, PCA to "
              f"{module.model.embedding.embedding_dim} dimensions ({explained:.0%} of the "
              "variance)", flush=True)
    if trainer.is_global_zero:
        logger.log_hyperparams(OmegaConf.to_container(cfg))
        atomic.write_json(
            work_dir / "state.json",
            {"fingerprint": key, "run_id": logger.run_id},
        )

    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    seconds = time.perf_counter() - started
    if not trainer.is_global_zero:
        return None
    resumed = {"from": resume_from, "at": position}
    return finish(cfg, trainer, logger, datamodule, work_dir, checkpoint_dir, report_path,
                  run_facts_path, seconds, resumed)


def portable_copy(source: Path, target: Path) -> None:
    """Copy a checkpoint with the absolute paths that ModelCheckpoint records in it
    (its directory, the best model's path) made relative to the working directory, so
    the same training gives the same bytes in any clone."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    for state in checkpoint.get("callbacks", {}).values():
        for key, value in state.items():
            if isinstance(value, str) and os.path.isabs(value):
                state[key] = os.path.relpath(value)
        if "best_k_models" in state:
            state["best_k_models"] = {os.path.relpath(k): v
                                      for k, v in state["best_k_models"].items()}
    torch.save(checkpoint, target)


def finish(cfg, trainer, logger, datamodule, work_dir, checkpoint_dir, report_path,
           run_facts_path, seconds, resumed) -> dict:
    """Move the checkpoints into place, log and tag them, and write the report and the
    run's facts (rank 0). Returns both in one dict."""
    checkpoint = trainer.checkpoint_callback
    with atomic.atomic_dir(checkpoint_dir) as tmp:
        portable_copy(Path(checkpoint.best_model_path), tmp / "best.ckpt")
        portable_copy(work_dir / "last.ckpt", tmp / "last.ckpt")
    best = checkpoint_dir / "best.ckpt"
    run = logger.experiment
    run.log_artifact(logger.run_id, str(best), "checkpoints")
    run.set_tag(logger.run_id, lineage.CHECKPOINT_TAG, lineage.digest(best))
    if PARAMS_FILE.exists():
        run.log_artifact(logger.run_id, str(PARAMS_FILE))
    report = {
        "monitor": cfg.train.monitor,
        "best_score": float(checkpoint.best_model_score),
        "best_checkpoint": str(best),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "stopped_early": trainer.early_stopping_callback.stopped_epoch > 0,
        "train_rows": len(datamodule.rows["train"]),
    }
    facts = {
        "run_id": logger.run_id,
        "experiment_id": logger.experiment_id,
        "resumed_from": str(resumed["from"]) if resumed["from"] else None,
        "resumed_at": resumed["at"],
        "wall_time_s": round(seconds, 1),
        # Optimizer steps x batch size over the whole fit, validation included.
        "sequences_per_s": round(trainer.global_step * cfg.train.batch_size / seconds, 1),
    }
    for name in ("wall_time_s", "sequences_per_s"):
        run.log_metric(logger.run_id, name, facts[name])
    atomic.write_json(report_path, report)
    atomic.write_json(run_facts_path, facts)
    shutil.rmtree(work_dir, ignore_errors=True)
    return {**report, **facts}


def pruning(cfg: DictConfig) -> bool:
    prune = cfg.train.get("prune")
    return bool(prune) and (prune.heads is not None or prune.d_ff is not None)


def prune_and_fine_tune(cfg: DictConfig, transfer: Path | None,
                        checkpoint_dir: Path = CHECKPOINT_DIR, **paths) -> dict:
    """Remove the weakest heads and feed-forward units from the best checkpoint's
    Transformer (pipeline/modeling/prune.py) and fine-tune what is left for `train.prune.epochs`
    on the same data; its checkpoints replace the unpruned model's."""
    from pipeline.modeling.inference import load_module
    from pipeline.modeling.prune import prune

    trained = load_module(checkpoint_dir / "best.ckpt")
    settings = cfg.train.prune
    model_cfg, state = prune(trained.model, dict(trained.hparams.model), settings.heads,
                             settings.d_ff)
    before = sum(p.numel() for p in trained.model.parameters())
    after = sum(v.numel() for v in state.values())
    print(f"train: pruned to {model_cfg['n_heads']} heads and {model_cfg['d_ff']} "
          f"feed-forward units per block ({after:,} of {before:,} parameters); "
          f"fine-tuning {settings.epochs} epoch(s)", flush=True)
    tuned = OmegaConf.merge(cfg, {"model": model_cfg, "train": {
        "max_epochs": settings.epochs, "lr": settings.lr, "init_embeddings": None}})
    return fit(tuned, checkpoint_dir=checkpoint_dir, transfer=transfer, start_from=state,
               tags={"pruned": "true"}, **paths)


def main() -> None:
    cfg, transfer = load_params(), transfer_set()
    if pruning(cfg) and (cfg.trainer.devices != 1 or cfg.trainer.num_nodes != 1):
        raise SystemExit("train: train.prune runs on one device; set trainer.devices=1 "
                         "and trainer.num_nodes=1, or prune nothing")
    report = fit(cfg, transfer=transfer)
    if report and pruning(cfg):
        report = prune_and_fine_tune(cfg, transfer)
    if report:
        print(f"train: best {report['monitor']} {report['best_score']:.4f} after "
              f"{report['epochs']} epochs in {report['wall_time_s']} s "
              f"(MLflow run {report['run_id']})")


if __name__ == "__main__":
    main()
