"""tune: hyperparameter search with Optuna, every trial an MLflow child run.

    python -m pipeline.loops.tune [hydra overrides...]      (make tune OVERRIDES="...")

Searches the space in `tune.space` (learning rate, model size, dropout, batch size)
with the TPE sampler, pruning trials whose validation metric falls below the median
of earlier trials at the same epoch. The budget is `tune.trials` trials or
`tune.timeout_s` seconds, whichever ends first; each trial trains for
`tune.max_epochs` epochs on `tune.limit_train_batches` of the data.

The best configuration is written to `conf/experiment/tuned.yaml` and params.yaml is
recomposed with `experiment=tuned`, so the next `dvc repro` trains it. (DVC's own
grid, `dvc exp run --queue -S train.lr=... ` then `dvc queue start`, is the
alternative that records every point as a DVC experiment.)
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback

from pipeline import atomic
from pipeline.config import Paths, compose, compose_params, tracking_uri
from pipeline.modeling.training import fit

TUNED_EXPERIMENT = "tuned"


class ReportToTrial(Callback):
    """Report the monitored metric to Optuna after each validation; prune on its word."""

    def __init__(self, trial: optuna.Trial, monitor: str):
        self.trial, self.monitor = trial, monitor

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        self.trial.report(float(trainer.callback_metrics[self.monitor]), trainer.current_epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.monitor} below the median at epoch "
                                     f"{trainer.current_epoch + 1}")


def suggest(trial: optuna.Trial, space: DictConfig) -> list[str]:
    """The trial's choices as Hydra overrides."""
    low, high = space.lr
    return [
        f"model={trial.suggest_categorical('model', list(space.model))}",
        f"train.lr={trial.suggest_float('lr', low, high, log=True)}",
        f"model.dropout={trial.suggest_float('dropout', *space.dropout)}",
        f"train.batch_size={trial.suggest_categorical('batch_size', list(space.batch_size))}",
    ]


@dataclass(frozen=True)
class TrialPaths(Paths):
    """A trial writes its checkpoints and reports under a scratch `root` and reads the
    pipeline's processed data, `data.processed`."""

    data: Paths = Paths()

    @property
    def processed(self) -> Path:
        return self.data.processed


def objective(trial: optuna.Trial, overrides: list[str], parent_run: str,
              paths: Paths, conf_dir: Path) -> float:
    base = compose(overrides, conf_dir)
    cfg = compose([*overrides, *suggest(trial, base.tune.space),
                   f"train.max_epochs={base.tune.max_epochs}",
                   f"train.limit_train_batches={base.tune.limit_train_batches}",
                   f"train.monitor={base.tune.metric}"], conf_dir)
    with tempfile.TemporaryDirectory() as tmp:
        report = fit(cfg, TrialPaths(Path(tmp), data=paths),
                     callbacks=[ReportToTrial(trial, base.tune.metric)],
                     tags={"mlflow.parentRunId": parent_run, "tune_trial": str(trial.number)})
    return report["best_score"]


def tuned_experiment(best: dict, value: float, metric: str, parent_run: str) -> str:
    return f"""# @package _global_
# Written by `make tune`: the best of its trials ({metric} {value:.4f}),
# MLflow parent run {parent_run}. Used through `experiment=tuned`.
defaults:
  - override /model: {best['model']}
model:
  dropout: {best['dropout']}
train:
  lr: {best['lr']}
  batch_size: {best['batch_size']}
"""


def tune(overrides: list[str], paths: Paths | None = None,
         conf_dir: Path = Path("conf"), params_file: Path = Path("params.yaml")) -> dict:
    cfg, paths = compose(overrides, conf_dir), paths or Paths()
    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(cfg.mlflow.experiment)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    )
    with mlflow.start_run(run_name="tune") as parent:
        mlflow.log_params({"tune_" + k: v for k, v in
                           OmegaConf.to_container(cfg.tune, resolve=True).items()
                           if k != "space"})
        mlflow.log_dict(OmegaConf.to_container(cfg.tune.space), "search_space.json")
        study.optimize(
            lambda trial: objective(trial, overrides, parent.info.run_id, paths,
                                    conf_dir),
            n_trials=cfg.tune.trials, timeout=cfg.tune.timeout_s,
            catch=(), gc_after_trial=True,
        )
        best = study.best_trial
        mlflow.log_params({f"best_{k}": v for k, v in best.params.items()})
        mlflow.log_metric(f"best_{cfg.tune.metric}", best.value)
        states = [t.state.name for t in study.trials]
        mlflow.log_metrics({"trials_complete": states.count("COMPLETE"),
                            "trials_pruned": states.count("PRUNED")})
    atomic.write_text(conf_dir / "experiment" / f"{TUNED_EXPERIMENT}.yaml",
                      tuned_experiment(best.params, best.value, cfg.tune.metric,
                                       parent.info.run_id))
    kept = [o for o in overrides if not o.startswith("experiment=")]
    compose_params([*kept, f"experiment={TUNED_EXPERIMENT}"], params_file, conf_dir)
    return {"best_params": best.params, "best_value": best.value, "trials": states,
            "parent_run_id": parent.info.run_id}


def main() -> None:
    result = tune(sys.argv[1:])
    print(f"tune: best {result['best_value']:.4f} with {result['best_params']} "
          f"({result['trials'].count('COMPLETE')} trials complete, "
          f"{result['trials'].count('PRUNED')} pruned; MLflow run {result['parent_run_id']})")
    print("tune: wrote conf/experiment/tuned.yaml and recomposed params.yaml with "
          "experiment=tuned; `dvc repro` now trains this configuration")


if __name__ == "__main__":
    main()
