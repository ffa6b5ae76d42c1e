"""One worker of `tune`: it takes trials from the shared study until the budget or the
time is spent, training each one for real (pipeline.modeling.training.fit).

The launcher (pipeline/loops/tune.py) runs a worker in its own process, or several in
spawned processes; workers on other machines share the study through its RDB storage.
A worker never writes the tuned configuration: only the launcher does, once, after
every worker has ended.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback

from pipeline.config import Paths, compose
from pipeline.loops.tune_space import Dimension, parse_space, trial_overrides
from pipeline.modeling.training import fit

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


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


@dataclass(frozen=True)
class TrialPaths(Paths):
    """A trial writes its checkpoints and reports under a scratch `root` and reads the
    pipeline's processed data, `data.processed`."""

    data: Paths = Paths()

    @property
    def processed(self) -> Path:
        return self.data.processed


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs, picklable for a spawned process."""

    overrides: tuple[str, ...]
    conf_dir: Path
    paths: Paths
    study_name: str
    storage: str | None     # None: the launcher's in-memory study, in its own process
    parent_run: str         # the MLflow run every trial nests under
    index: int
    seed: int
    deadline: float         # time.time() after which no trial starts
    threads: int | None = None  # torch threads; None leaves the process's setting alone
    verbose: bool = False


class LocalBudget:
    """At most `limit` trials started by this machine's workers together: a counter in
    shared memory, claimed before each trial, so N workers start exactly `limit`
    trials however their trials' lengths differ. `ready()` lines the workers up first,
    so each one's first trial starts together rather than after the fastest worker's
    start-up (importing torch) has claimed several."""

    START_WAIT_S = 300  # a worker that never gets ready does not hold the others

    def __init__(self, limit: int, counter, barrier):
        # multiprocessing's Value("i") and Barrier(workers), shared with the workers
        self.limit, self.counter, self.barrier = limit, counter, barrier

    def ready(self) -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            self.barrier.wait(self.START_WAIT_S)

    def claim(self) -> bool:
        with self.counter.get_lock():
            if self.counter.value >= self.limit:
                return False
            self.counter.value += 1
            return True


def quiet_libraries(verbose: bool) -> None:
    """Optuna logs every trial at INFO, and Lightning its devices, tips and hints at
    every fit; a worker prints its own line per trial instead. `verbose` keeps them."""
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    if verbose:
        return
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric",
                 "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"(pytorch_lightning|lightning_fabric)\.")


def finished(study: optuna.Study) -> int:
    """Trials that count against the budget, from every worker of every machine."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def sampler(seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed)


def pruner() -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)


def storage(url: str) -> optuna.storages.RDBStorage:
    """The study's database. A bare postgresql:// URL means psycopg 3 to SQLAlchemy 2.1;
    the driver installed is psycopg2, so name it. SQLite serialises writers: wait for
    the lock rather than fail when another worker holds it."""
    scheme, rest = url.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        url = f"postgresql+psycopg2://{rest}"
    engine = {"connect_args": {"timeout": 60}} if scheme == "sqlite" else None
    return optuna.storages.RDBStorage(url, engine_kwargs=engine)


def objective(trial: optuna.Trial, base: DictConfig, space: list[Dimension],
              spec: WorkerSpec) -> float:
    # which process ran the trial: the study then shows how the work was shared
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("torch_threads", torch.get_num_threads())
    cfg = compose([*spec.overrides, *trial_overrides(space, trial),
                   f"train.max_epochs={base.tune.max_epochs}",
                   f"train.limit_train_batches={base.tune.limit_train_batches}",
                   f"train.monitor={base.tune.metric}"], spec.conf_dir)
    with tempfile.TemporaryDirectory() as tmp:
        report = fit(cfg, TrialPaths(Path(tmp), data=spec.paths),
                     callbacks=[ReportToTrial(trial, base.tune.metric)],
                     tags={"mlflow.parentRunId": spec.parent_run,
                           "tune_study": spec.study_name,
                           "tune_trial": str(trial.number)})
    return report["best_score"]


def announce(index: int, metric: str):
    """A readable line per finished trial (Optuna's own INFO lines are off)."""
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        outcome = "" if trial.value is None else f"{metric} {trial.value:.4f}"
        if trial.state != optuna.trial.TrialState.COMPLETE:  # a pruned trial's last value
            epochs = len(trial.intermediate_values)
            outcome = f"{trial.state.name.lower()} after {epochs} epoch(s) {outcome}"
        chosen = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in trial.params.items())
        print(f"tune: trial {trial.number}: {outcome} [{chosen}] (worker {index}, "
              f"{finished(study)} finished)", flush=True)
    return callback


def search(spec: WorkerSpec, budget: LocalBudget, study: optuna.Study | None = None) -> None:
    """Run trials until the study holds `tune.trials` finished trials, this machine's
    budget is claimed, or the deadline has passed. `study` is the launcher's own when
    the worker runs in its process (an in-memory study can be shared no other way);
    a spawned worker opens `spec.storage`."""
    quiet_libraries(spec.verbose)
    if spec.threads:  # N workers on one machine share its cores
        torch.set_num_threads(spec.threads)
    if study is None:
        study = optuna.load_study(study_name=spec.study_name, storage=storage(spec.storage),
                                  sampler=sampler(spec.seed), pruner=pruner())
    base = compose(list(spec.overrides), spec.conf_dir)
    space = parse_space(base.tune.space, spec.conf_dir)
    budget.ready()
    # Checked before each trial, not after it as MaxTrialsCallback does: a worker on
    # another machine may have finished the last trial of the budget meanwhile.
    while (time.time() < spec.deadline and finished(study) < base.tune.trials
           and budget.claim()):
        study.optimize(lambda trial: objective(trial, base, space, spec), n_trials=1,
                       catch=(), gc_after_trial=True,
                       callbacks=[announce(spec.index, base.tune.metric)])


def work(spec: WorkerSpec, budget: LocalBudget) -> None:
    """A spawned worker process's entry point."""
    search(spec, budget)
