"""Federated training (`trainer=federated`): the training split partitioned into
clients, Flower rounds of local training and averaging, and the result handed on as
the checkpoints and report a centralised fit leaves, so that evaluate, the gate,
deploy and the service take it unchanged.

`trainer.federated.mode`:
- `simulation`: every client in this process, trained one after another; the fastest
  way to measure a federated setting;
- `clients`: a Flower server in this process and one process per client
  (`pipeline/modeling/federated/client.py`), talking gRPC over TLS on loopback, each
  client holding only its own rows. A client that dies mid-round is counted as a failure and
  the run goes on with those left, down to `min_clients`.

A federated fit does not resume after a kill: it starts again from round 1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from flwr.server import Server, SimpleClientManager
from flwr.server.superlink.fleet.grpc_bidi.grpc_server import start_grpc_server
from omegaconf import DictConfig, OmegaConf

from pipeline import atomic, tasks
from pipeline.config import Paths
from pipeline.data.splits import column, load_splits
from pipeline.modeling import privacy, training
from pipeline.modeling.federated import client as local
from pipeline.modeling.federated import privacy as client_privacy
from pipeline.modeling.federated import tls
from pipeline.modeling.federated.partition import describe, partition
from pipeline.modeling.federated.server import GlobalModel, InProcessClient, Tracked
from pipeline.modeling.federated.strategies import SERVER_STEPPED, strategy
from pipeline.reporting import figures, sources
from pipeline.tracking import privacy as privacy_record


def check_settings(cfg: DictConfig, distilling: bool, pruning: bool) -> None:
    """SystemExit naming what a federated fit cannot combine with."""
    settings = cfg.trainer.federated
    clashes = [(privacy.enabled(cfg), "train.privacy (DP-SGD inside each client is not "
                "wired in; trainer.federated.privacy protects whole clients)"),
               (client_privacy.enabled(settings) and settings.strategy in SERVER_STEPPED,
                f"trainer.federated.privacy with strategy={settings.strategy} (its noised "
                "average takes the strategy's place)"),
               (client_privacy.enabled(settings) and settings.get("control_variates"),
                "trainer.federated.privacy with control_variates (each client's would "
                "reach the server unclipped and unnoised)"),
               (distilling, "a teacher's transfer set (distill)"),
               (pruning, "train.prune (its fine-tuning would see every client's rows)"),
               (cfg.train.get("ema_decay") is not None, "train.ema_decay")]
    named = [what for clash, what in clashes if clash]
    if named:
        raise SystemExit(f"train: trainer=federated does not combine with {', '.join(named)}")


def training_columns(paths: Paths) -> tuple[list | None, list | None, int]:
    """The training split's labels and groups (None where it has none) and its rows."""
    train = load_splits(paths.processed)["train"]
    labels = column(train, "label") if "label" in train.column_names else None
    groups = column(train, "group") if "group" in train.column_names else None
    return labels, groups, train.num_rows


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def simulate(tracked: Tracked, settings: DictConfig, rounds: int, clients: list) -> None:
    manager = SimpleClientManager()
    for number, client in enumerate(clients):
        manager.register(InProcessClient(str(number), client))
    server = Server(client_manager=manager, strategy=tracked)
    server.set_max_workers(1)  # one Lightning fit at a time in this process
    server.fit(num_rounds=rounds, timeout=float(settings.round_timeout_s))


def with_clients(tracked: Tracked, settings: DictConfig, rounds: int,
                 parts: list[list[int]], work_dir: Path) -> None:
    """A Flower server on a free loopback port, over TLS with this run's certificate
    (tls.py), and a process per client; the server and every client process are
    stopped when the rounds end or fail, or on SIGTERM. (Flower's `start_server` does
    the same work but leaves its gRPC server running, port and threads, when a round
    raises.)"""
    address = f"{tls.HOST}:{free_port()}"
    threads = max(1, (os.cpu_count() or 1) // len(parts)) if parts else 1
    certificate, key = tls.run_certificate()
    trusted = work_dir / "federation.crt"  # public: what the clients trust
    atomic.write_bytes(trusted, certificate)
    server = Server(client_manager=SimpleClientManager(), strategy=tracked)
    grpc_server = start_grpc_server(client_manager=server.client_manager(),
                                    server_address=address,
                                    certificates=tls.server_certificates(certificate, key))
    processes: list[subprocess.Popen] = []

    def stop_now(signal_number: int, frame) -> None:
        # A round in progress waits for its clients' answers (up to round_timeout_s):
        # closing the server and the clients first ends it at once. The run is
        # abandoned, so nothing a client holds is worth waiting for.
        grpc_server.stop(None)
        for process in processes:
            process.kill()
        raise SystemExit(128 + signal_number)

    previous = signal.signal(signal.SIGTERM, stop_now)
    try:
        for number, rows in enumerate(parts):
            path = work_dir / "partitions" / f"client-{number}.json"
            atomic.write_json(path, {"client": number, "rows": rows})
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "pipeline.modeling.federated.client",
                 "--address", address, "--partition", str(path), "--threads", str(threads),
                 "--root-certificate", str(trusted),
                 "--connect-timeout", str(settings.connect_timeout_s)]))
        timeout = float(settings.round_timeout_s)
        server.fit(num_rounds=rounds, timeout=timeout)
        server.disconnect_all_clients(timeout=timeout)
    finally:
        signal.signal(signal.SIGTERM, previous)
        grpc_server.stop(grace=1).wait()
        terminate(processes)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def terminate(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()


def fit(cfg: DictConfig, paths: Paths, tags: dict | None = None) -> dict:
    """Train federated; write and return the report a centralised fit would (the
    caller has run `check_settings`)."""
    settings = cfg.trainer.federated
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    task, work_dir = tasks.from_config(cfg), paths.train_work
    shutil.rmtree(work_dir, ignore_errors=True)  # nothing to resume (module docstring)
    work_dir.mkdir(parents=True, exist_ok=True)
    labels, groups, rows = training_columns(paths)
    clients = int(settings.clients)
    parts = partition(settings.partition, clients, labels, groups, rows, cfg.seed)
    rounds = int(settings.rounds or cfg.train.max_epochs)
    datamodule = task.datamodule(cfg, paths)
    datamodule.setup("fit")
    module = task.module(cfg, paths)
    task.warm_start(module, cfg, paths)
    buffers = local.buffer_positions(module.model)
    protected = None
    if client_privacy.enabled(settings):
        if buffers:
            raise SystemExit("train: trainer.federated.privacy needs a model without "
                             "buffers: BatchNorm's running statistics would leave the "
                             "clients unclipped and without noise (image models: set "
                             "model.norm=group)")
        protected = client_privacy.ClientLevelPrivacy(settings, clients, rounds)
        print(f"train: client-level differential privacy: noise multiplier "
              f"{protected.noise_multiplier:.3f} for epsilon {settings.privacy.epsilon} at "
              f"delta {protected.delta:.2g} over {rounds} rounds", flush=True)
    profile = atomic.read_json(paths.processed / "profile.json")
    logger = training.mlflow_logger(cfg, profile["data"]["content_hash"], None,
                                    {"trainer": "federated", **(tags or {})})
    logger.log_hyperparams(OmegaConf.to_container(cfg))
    global_model = GlobalModel(module, datamodule, cfg, work_dir, logger.log_metrics)
    inner = strategy(settings, local.weights(module.model), int(settings.local_epochs),
                     rounds, buffers)
    tracked = Tracked(inner, settings, clients, rounds, global_model, buffers, protected)
    print(f"train: federated, {settings.mode}: {clients} clients ({settings.partition.by} "
          f"partition, {min(map(len, parts))}-{max(map(len, parts))} rows each), "
          f"{rounds} rounds of {settings.local_epochs} local epoch(s), {settings.strategy}",
          flush=True)
    started = time.perf_counter()
    if settings.mode == "simulation":
        shared = task.module(cfg, paths)  # the clients train one after another
        simulate(tracked, settings, rounds, [
            local.build(cfg, paths, number, part, datamodule, shared)
            for number, part in enumerate(parts)])
    elif settings.mode == "clients":
        with_clients(tracked, settings, rounds, parts, work_dir)
    else:
        raise SystemExit(f"train: trainer.federated.mode {settings.mode!r} is not "
                         "simulation or clients")
    seconds = time.perf_counter() - started
    if global_model.best_score is None:
        raise SystemExit("train: no federated round finished; nothing to hand on")
    curves = [{"epoch": r["round"], "step": r["round"], "train_loss": r["train_loss"],
               **{k: v for k, v in r.items() if k.startswith("val_")}}
              for r in tracked.rounds_log]
    atomic.write_json(paths.train_curves, curves)
    atomic.write_bytes(paths.train_curves_image, figures.training_curves_png(curves))
    for path in (paths.train_curves, paths.train_curves_image):
        logger.experiment.log_artifact(logger.run_id, str(path), sources.TRAINING)
    summary = {"mode": settings.mode, "strategy": settings.strategy, "clients": clients,
               "partition": OmegaConf.to_container(settings.partition),
               "balanced_loss": local.balanced_loss(settings, labels is not None),
               "carry_optimizer_state": bool(settings.get("carry_optimizer_state")),
               "control_variates": bool(settings.get("control_variates")),
               "rounds": len(tracked.rounds_log)}
    if settings.strategy == "fedexp":
        summary["average_last_two"] = bool(settings.get("average_last_two"))
    if protected is not None:
        summary["privacy"] = protected.record()
    for name in ("best.ckpt", "last.ckpt"):  # evaluate and the model card read it there
        checkpoint = torch.load(work_dir / name, map_location="cpu", weights_only=False)
        checkpoint[privacy_record.FEDERATED_KEY] = summary
        torch.save(checkpoint, work_dir / name)
    outcome = {
        "best_path": work_dir / "best.ckpt", "best_score": global_model.best_score,
        "epochs": len(tracked.rounds_log),
        "global_step": sum(r["steps"] or 0 for r in tracked.rounds_log),
        "stopped_early": False,
        "federated": {
            **summary, "best_round": global_model.best_round,
            # each client's rows and labels: unnoised, so not in a private run's report
            "clients_rows": None if protected else describe(parts, labels),
            "rounds": [{key: r[key] for key in ("round", "clients", "failures", "rows",
                                                "server_step") if key in r}
                       for r in tracked.rounds_log],
        },
    }
    return training.finish(cfg, logger, paths, outcome, rows, seconds,
                           {"from": None, "at": None})
