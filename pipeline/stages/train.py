"""train: fit the configured model (pipeline/modeling/training.py), on the labels or,
with a teacher, on the transfer set; with `train.prune`, prune it and fine-tune what is
left.

Output: `models/checkpoints/{best,last}.ckpt` and `reports/train.json` (best score,
epochs, steps: what the code, data and parameters determine, the same bytes in every
run on one CPU); `reports/train_curves.{json,png}` (per-epoch metrics, DVC plots);
`reports/runs/train.json` (this run's MLflow run id, wall time and
throughput, which DVC does not track); an MLflow run with every resolved parameter,
the per-epoch curves, the git commit, the data hash, and the best checkpoint, tagged
with the checkpoint's sha256 (`pipeline.tracking.lineage`).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline import logs, tasks
from pipeline.config import Paths, load_params
from pipeline.modeling.training import fit


def transfer_set(paths: Paths) -> Path | None:
    """The transfer set to train on, when the transfer stage wrote one (a teacher is
    configured); None: train on the labelled training split."""
    dataset = paths.transfer / "dataset"
    return dataset if dataset.is_dir() else None


def pruning(cfg: DictConfig) -> bool:
    prune = cfg.train.get("prune")
    return bool(prune) and (prune.heads is not None or prune.d_ff is not None)


def prune_and_fine_tune(cfg: DictConfig, paths: Paths, transfer: Path | None) -> dict:
    """Remove the weakest heads and feed-forward units from the best checkpoint's
    Transformer (pipeline/tasks/text_classification/prune.py) and fine-tune what is
    left for `train.prune.epochs` on the same data; its checkpoints replace the
    unpruned model's."""
    from pipeline.tasks.text_classification.prune import prune

    trained = tasks.from_config(cfg).load_module(paths.checkpoint)
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
    return fit(tuned, paths, transfer=transfer, start_from=state, tags={"pruned": "true"})


def main() -> None:
    logs.quiet()
    cfg, paths = load_params(), Paths()
    transfer = transfer_set(paths)
    if pruning(cfg) and (cfg.trainer.devices != 1 or cfg.trainer.num_nodes != 1):
        raise SystemExit("train: train.prune runs on one device; set trainer.devices=1 "
                         "and trainer.num_nodes=1, or prune nothing")
    report = fit(cfg, paths, transfer=transfer)
    if report and pruning(cfg):
        report = prune_and_fine_tune(cfg, paths, transfer)
    if report:
        print(f"train: best {report['monitor']} {report['best_score']:.4f} after "
              f"{report['epochs']} epochs in {report['wall_time_s']} s "
              f"(MLflow run {report['run_id']})")


if __name__ == "__main__":
    main()
