"""tune: hyperparameter search with Optuna, every trial an MLflow child run, on one
process, N processes, or several machines sharing one study.

    python -m pipeline.loops.tune [hydra overrides...]      (make tune OVERRIDES="...")
    python -m pipeline.loops.tune --workers 4
    python -m pipeline.loops.tune --storage postgresql://user@db/optuna --study sst2 --workers 2

Searches the space in `tune.space` (conf/tune/default.yaml; pipeline/loops/tune_space.py
reads it) with the TPE sampler, pruning trials whose validation metric falls below the
median of earlier trials at the same epoch. The budget is `tune.trials` finished trials
(complete or pruned) in the study, whoever ran them, or `tune.timeout_s` seconds,
whichever ends first; each trial trains for `tune.max_epochs` epochs on
`tune.limit_train_batches` of the data.

With `--storage` the study lives in that database under `--study`: every launcher given
the same URL and name joins the same search, and one started after the budget is spent
runs no trial and only writes the best configuration. Without it the study lives in
memory (one worker) or in a temporary SQLite file (several): nothing is left behind to
be resumed by mistake, as before this option existed.

When every worker has ended, the launcher alone writes the study's best configuration to
`conf/experiment/tuned.yaml` and recomposes params.yaml with `experiment=tuned`, so the
next `dvc repro` trains it. (DVC's own grid, `dvc exp run --queue -S train.lr=...` then
`dvc queue start`, is the alternative that records every point as a DVC experiment.)
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import socket
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import mlflow
import optuna
from omegaconf import DictConfig, OmegaConf

from pipeline import atomic
from pipeline.config import Paths, compose, compose_params, tracking_uri
from pipeline.loops import tune_worker as worker
from pipeline.loops.tune_space import (
    check_against_conf,
    override_key,
    parse_space,
    tuned_experiment,
)

TUNED_EXPERIMENT = "tuned"
DEFAULT_STUDY = "tune"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
PARENT_WAIT_S = 30  # how long a joining launcher waits for the creator's parent run


@contextlib.contextmanager
def study_storage(storage: str | None, workers: int) -> Iterator[str | None]:
    """The storage URL the workers share: the given one; none (in memory) for a single
    worker; a temporary SQLite file, gone afterwards, for several."""
    if storage or workers == 1:
        yield storage
        return
    with tempfile.TemporaryDirectory(prefix="textops-tune-") as tmp:
        yield f"sqlite:///{tmp}/study.db"


def direction(metric: str) -> str:
    return "minimize" if metric.endswith("loss") else "maximize"


def worker_seed(seed: int, index: int, shared: bool) -> int:
    """Distinct seeds, so concurrent workers do not sample the same first points. A
    study shared with other machines mixes in the host name; a local search keeps
    `seed` for its first worker, so a one-process search repeats."""
    if not shared:
        return seed + index
    return zlib.crc32(f"{socket.gethostname()}/{seed}/{index}".encode())


def new_parent_run(cfg: DictConfig, study_name: str) -> str:
    """The run every trial of the study nests under, with the search's settings."""
    name = "tune" if study_name == DEFAULT_STUDY else f"tune-{study_name}"
    with mlflow.start_run(run_name=name, tags={"tune_study": study_name}) as run:
        mlflow.log_params({"tune_" + k: v for k, v in
                           OmegaConf.to_container(cfg.tune, resolve=True).items()
                           if k != "space"})
        mlflow.log_dict(OmegaConf.to_container(cfg.tune.space), "search_space.json")
    return run.info.run_id


def joined_parent_run(study: optuna.Study, cfg: DictConfig, study_name: str) -> str:
    """The parent run of a study another launcher created: its id is in the study. If
    this machine tracks into another MLflow, where that run does not exist, the trials
    run here nest under a parent run of their own, tagged with the study's name."""
    deadline = time.monotonic() + PARENT_WAIT_S
    while PARENT_RUN_ATTR not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.5)  # the creator sets it right after creating the study
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    try:
        if run_id:
            return mlflow.MlflowClient().get_run(run_id).info.run_id
    except mlflow.exceptions.MlflowException:
        pass
    print(f"tune: study {study_name!r} names no parent run in this machine's MLflow; "
          "the trials run here nest under one of their own")
    return new_parent_run(cfg, study_name)


def open_study(url: str | None, name: str, cfg: DictConfig,
               seed: int) -> tuple[optuna.Study, str]:
    """Create the study, or join it if another launcher did; with its parent run id.
    Creating is the test-and-set: exactly one launcher creates the parent run."""
    options = {"study_name": name, "sampler": worker.sampler(seed), "pruner": worker.pruner()}
    store = worker.storage(url) if url else None
    try:
        study = optuna.create_study(storage=store, direction=direction(cfg.tune.metric),
                                    **options)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=store, **options)
        return study, joined_parent_run(study, cfg, name)
    parent = new_parent_run(cfg, name)
    study.set_user_attr(PARENT_RUN_ATTR, parent)
    return study, parent


def best_trial(study: optuna.Study, study_name: str) -> optuna.trial.FrozenTrial:
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise RuntimeError(f"tune: study {study_name!r} has no complete trial (the "
                           "budget or tune.timeout_s ran out first, or every trial was "
                           "pruned or failed); nothing to write")
    return study.best_trial


def cores() -> int:
    """The cores this process may run on (a container's or taskset's share)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def search(study: optuna.Study, specs: list[worker.WorkerSpec], limit: int) -> None:
    """Run the workers: one in this process (it can share an in-memory study), or one
    spawned process each, all drawing on a budget of `limit` trials. A failed worker
    does not stop the others (the budget's other trials still finish, and a rerun with
    the same storage resumes the study); its failure is raised once all have ended."""
    context = multiprocessing.get_context("spawn")  # no forked torch or MLflow state
    budget = worker.LocalBudget(limit, context.Value("i", 0), context.Barrier(len(specs)))
    if limit == 0:  # the study's budget is spent: no process to start
        return
    if len(specs) == 1:
        worker.search(specs[0], budget, study)
        return
    processes = [context.Process(target=worker.work, args=(spec, budget),
                                 name=f"tune-worker-{spec.index}") for spec in specs]
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.join()
    finally:
        for process in processes:
            if process.is_alive():  # the launcher was interrupted
                process.terminate()
                process.join()
    failed = [f"{p.name} (exit code {p.exitcode})" for p in processes if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"tune: {', '.join(failed)} failed; see the output above. With "
                           "--storage, a rerun with the same --study resumes the study.")


def write_tuned(best: optuna.trial.FrozenTrial, finished: int, cfg: DictConfig,
                overrides: list[str], searched: set[str], study_name: str, parent: str,
                conf_dir: Path, params_file: Path) -> None:
    """conf/experiment/tuned.yaml from the best trial, and params.yaml composed with it."""
    note = [f"Written by `make tune`: the best of the {finished} finished trials of study "
            f"{study_name!r}, trial {best.number} ({cfg.tune.metric} {best.value:.4f}),",
            f"MLflow parent run {parent}. Used through `experiment=tuned`."]
    atomic.write_text(conf_dir / "experiment" / f"{TUNED_EXPERIMENT}.yaml",
                      tuned_experiment(best.params, conf_dir, note))
    # an override of a searched key would undo the tuned value; tune.* only configured
    # the search
    kept = [o for o in overrides if override_key(o) not in {*searched, "experiment", "tune"}
            and not override_key(o).startswith("tune.")]
    compose_params([*kept, f"experiment={TUNED_EXPERIMENT}"], params_file, conf_dir)


def tune(overrides: list[str], paths: Paths | None = None, conf_dir: Path = Path("conf"),
         params_file: Path = Path("params.yaml"), *, storage: str | None = None,
         workers: int = 1, study_name: str = DEFAULT_STUDY, verbose: bool = False) -> dict:
    """Search with `workers` processes on this machine, in the study `study_name` of
    `storage` (None: a study of this run alone), then write the best configuration.
    Returns the best trial's parameters, value and number, every trial's state, and
    the MLflow parent run's id."""
    if workers < 1:
        raise ValueError(f"tune: --workers must be at least 1, got {workers}")
    cfg, paths = compose(overrides, conf_dir), paths or Paths()
    conf_dir, paths = Path(conf_dir).resolve(), Paths(paths.root.resolve())
    space = parse_space(cfg.tune.space, conf_dir)  # fail before any trial does
    check_against_conf(space, overrides, lambda more: compose(more, conf_dir))
    worker.quiet_libraries(verbose)
    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(cfg.mlflow.experiment)
    deadline, shared = time.time() + cfg.tune.timeout_s, storage is not None

    with study_storage(storage, workers) as url:
        study, parent = open_study(url, study_name, cfg, worker_seed(cfg.seed, 0, shared))
        with mlflow.start_run(run_id=parent):
            specs = [worker.WorkerSpec(
                tuple(overrides), conf_dir, paths, study_name, url, parent, index,
                worker_seed(cfg.seed, index, shared), deadline, verbose=verbose,
                # N workers on this machine: each gets its share of the cores
                threads=max(1, cores() // workers) if workers > 1 else None)
                for index in range(workers)]
            search(study, specs, max(0, cfg.tune.trials - worker.finished(study)))
            best, finished = best_trial(study, study_name), worker.finished(study)
            states = [t.state.name for t in study.get_trials(deepcopy=False)]
            mlflow.set_tags({f"best.{k}": v for k, v in best.params.items()})
            mlflow.log_metrics({f"best_{cfg.tune.metric}": best.value,
                                "trials_complete": states.count("COMPLETE"),
                                "trials_pruned": states.count("PRUNED")})

    write_tuned(best, finished, cfg, overrides, {d.key for d in space} | set(best.params),
                study_name, parent, conf_dir, params_file)
    return {"best_params": best.params, "best_value": best.value, "best_trial": best.number,
            "trials": states, "parent_run_id": parent, "study": study_name}


EXAMPLES = """\
examples:
  python -m pipeline.loops.tune                          # tune.trials trials, in process
  python -m pipeline.loops.tune --workers 4 --trials 20  # 4 processes share 20 trials
  python -m pipeline.loops.tune tune.space.model.choices=[lstm] 'tune.space={train.lr:{low:1.0e-4}}'
  # several machines, one search: run the same line on each
  python -m pipeline.loops.tune --storage postgresql://user:pw@db:5432/optuna \\
      --study sst2-lr --workers 2
  # a finished shared study: no trial runs, tuned.yaml is written from its best
  python -m pipeline.loops.tune --storage sqlite:///tune.db --study sst2-lr
"""


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.loops.tune", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Optuna search over tune.space (conf/tune/); writes the best "
                    "configuration to conf/experiment/tuned.yaml and recomposes "
                    "params.yaml with experiment=tuned.")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                        help="Hydra overrides, e.g. experiment=smoke tune.timeout_s=600")
    parser.add_argument("--storage", metavar="URL",
                        help="SQLAlchemy URL of the study's database (sqlite:///tune.db, "
                             "postgresql://user@host/db); launchers given the same URL and "
                             "--study share one search and one trial budget. Default: "
                             "in memory, or a temporary SQLite file for --workers > 1")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="worker processes on this machine (default 1: in this "
                             "process); each gets cores/N torch threads")
    parser.add_argument("--study", default=DEFAULT_STUDY, metavar="NAME",
                        help=f"study name in the storage (default {DEFAULT_STUDY!r})")
    parser.add_argument("--trials", type=int, metavar="N",
                        help="finished trials in the whole study (sets tune.trials)")
    parser.add_argument("--verbose", action="store_true", help="Optuna's own INFO logging")
    return parser


def main(argv: list[str] | None = None) -> None:
    cli = parser()
    args = cli.parse_intermixed_args(argv)
    if args.workers < 1:
        cli.error(f"--workers must be at least 1, got {args.workers}")
    overrides = list(args.overrides)
    if args.trials is not None:  # last, so it wins over an override's tune.trials
        overrides.append(f"tune.trials={args.trials}")
    result = tune(overrides, storage=args.storage, workers=args.workers,
                  study_name=args.study, verbose=args.verbose)
    print(f"tune: best {result['best_value']:.4f} (trial {result['best_trial']}) with "
          f"{result['best_params']} ({result['trials'].count('COMPLETE')} trials complete, "
          f"{result['trials'].count('PRUNED')} pruned; MLflow run {result['parent_run_id']})")
    print("tune: wrote conf/experiment/tuned.yaml and recomposed params.yaml with "
          "experiment=tuned; `dvc repro` now trains this configuration")


if __name__ == "__main__":
    main()
