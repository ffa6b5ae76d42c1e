"""train: fit the configured model (pipeline/modeling/training.py), on the labels or,
with a teacher, on the transfer set; with `train.prune`, prune it and fine-tune what is
left. `trainer=federated` trains it across clients instead
(pipeline/modeling/federated/).

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
    """Whether `train.prune` asks for anything: text's heads or d_ff, images' channels."""
    prune = cfg.train.get("prune")
    return bool(prune) and any(prune.get(key) is not None
                               for key in ("heads", "d_ff", "channels"))


def changes(before: dict, after: dict) -> str:
    """The model options pruning changed, e.g. `n_heads=1, d_ff=16` or `widths=[16, 32]`."""
    return ", ".join(f"{key}={value}" for key, value in after.items()
                     if before.get(key) != value)


def prune_and_fine_tune(cfg: DictConfig, paths: Paths, transfer: Path | None) -> dict:
    """Prune the best checkpoint's model through its task (`Task.prune`: the Transformer's
    weakest heads and feed-forward units, the image cnn's weakest convolution channels)
    and fine-tune what is left for `train.prune.epochs` on the same data; its
    checkpoints replace the unpruned model's."""
    task = tasks.from_config(cfg)
    trained = task.load_module(paths.checkpoint)
    settings = cfg.train.prune
    model_cfg, state = task.prune(trained, settings)
    before = sum(p.numel() for p in trained.model.parameters())
    # Parameters only: buffers (a norm's running statistics) are not weights.
    names = {name for name, _ in trained.model.named_parameters()}
    after = sum(v.numel() for k, v in state.items() if k in names)
    print(f"train: pruned to {changes(dict(trained.hparams.model), model_cfg)} ({after:,} of "
          f"{before:,} parameters); fine-tuning {settings.epochs} epoch(s)", flush=True)
    train = {"max_epochs": settings.epochs, "lr": settings.lr}
    if "init_embeddings" in cfg.train:  # the pruned model starts from its own weights
        train["init_embeddings"] = None
    tuned = OmegaConf.merge(cfg, {"model": model_cfg, "train": train})
    return fit(tuned, paths, transfer=transfer, start_from=state, tags={"pruned": "true"})


def main() -> None:
    logs.quiet()
    cfg, paths = load_params(), Paths()
    transfer = transfer_set(paths)
    if pruning(cfg) and (cfg.trainer.devices != 1 or cfg.trainer.num_nodes != 1):
        raise SystemExit("train: train.prune runs on one device; set trainer.devices=1 "
                         "and trainer.num_nodes=1, or prune nothing")
    if cfg.trainer.get("federated") is not None:  # trainer=federated
        from pipeline.modeling.federated import run as federated

        federated.check_settings(cfg, distilling=transfer is not None, pruning=pruning(cfg))
        report = federated.fit(cfg, paths)
    else:
        report = fit(cfg, paths, transfer=transfer)
    if report and pruning(cfg):
        report = prune_and_fine_tune(cfg, paths, transfer)
    if report:
        passes = "rounds" if "federated" in report else "epochs"
        print(f"train: best {report['monitor']} {report['best_score']:.4f} after "
              f"{report['epochs']} {passes} in {report['wall_time_s']} s "
              f"(MLflow run {report['run_id']})")


if __name__ == "__main__":
    main()
