"""Training benchmark: the Lightning train stage against a plain PyTorch loop.

    python bench/bench_training.py [--steps 300] [--repeats 2] [--no-repro]   (make bench)

Both train the configured model (params.yaml) on the processed training split with
the same length-grouped batches, optimiser, schedule and clipping, for the same
number of steps, interleaved; the ratio of their sequences per second is printed
(target >= 0.95). Then times an end-to-end `dvc repro` of the smoke experiment in a
temporary copy of the repository, and a no-op `dvc repro` after it.
Publishes bench/results/training.json and docs/results/training.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from transformers import get_cosine_schedule_with_warmup

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from repo import clone_to, sh  # noqa: E402
from results import Result, Table, publish  # noqa: E402

from pipeline import tasks  # noqa: E402
from pipeline.config import Paths, load_params  # noqa: E402
from pipeline.tasks.text_classification.classifier import parameter_groups  # noqa: E402


def plain_loop(cfg, datamodule, task, steps: int) -> float:
    """Sequences per second of a hand-written loop over the same model and data."""
    torch.manual_seed(cfg.seed)
    model = task.module(cfg, Paths(ROOT)).model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.train.weight_decay),
                                  lr=cfg.train.lr)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(cfg.train.warmup_ratio * steps),
                                               steps)
    seen, started = 0, time.perf_counter()
    for step, batch in enumerate(datamodule.train_dataloader()):
        if step == steps:
            break
        logits = model(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"],
                               label_smoothing=cfg.train.label_smoothing)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.gradient_clip_val)
        optimizer.step()
        schedule.step()
        seen += len(batch["labels"])
    return seen / (time.perf_counter() - started)


class Clock(pl.Callback):
    """Times the training batches only, as the plain loop is timed."""

    def on_train_start(self, trainer, module):
        self.seen, self.started = 0, time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen += len(batch["labels"])

    def on_train_end(self, trainer, module):
        self.seconds = time.perf_counter() - self.started


def lightning_loop(cfg, datamodule, task, steps: int) -> float:
    """Sequences per second of the train stage's LightningModule in a Lightning
    Trainer, without the stage's logger, checkpoints and callbacks."""
    torch.manual_seed(cfg.seed)
    module = task.module(cfg, Paths(ROOT))
    clock = Clock()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0,
                         num_sanity_val_steps=0, gradient_clip_val=cfg.train.gradient_clip_val,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[clock])
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    return clock.seen / clock.seconds


def time_repro() -> dict:
    """Wall time of `dvc repro` on the smoke experiment, and of a no-op repeat."""
    with tempfile.TemporaryDirectory() as tmp:
        repo = clone_to(Path(tmp) / "repo", ["experiment=smoke"])
        started = time.perf_counter()
        sh(repo, "dvc", "repro")
        full = time.perf_counter() - started
        started = time.perf_counter()
        sh(repo, "dvc", "repro")
        return {"smoke_repro_s": round(full, 1),
                "noop_repro_s": round(time.perf_counter() - started, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-repro", action="store_true")
    args = parser.parse_args()

    cfg = load_params(ROOT / "params.yaml")
    task = tasks.from_config(cfg)
    datamodule = task.datamodule(cfg, Paths(ROOT))
    datamodule.setup()
    runs = {"plain": [], "lightning": []}
    for _ in range(args.repeats):  # interleaved: the machine's speed drifts
        runs["plain"].append(plain_loop(cfg, datamodule, task, args.steps))
        runs["lightning"].append(lightning_loop(cfg, datamodule, task, args.steps))
    plain, lightning = max(runs["plain"]), max(runs["lightning"])
    ratio = lightning / plain
    print(f"model {cfg.model.name}, batch {cfg.train.batch_size}, {args.steps} steps x "
          f"{args.repeats}: plain loop {plain:.0f} seq/s, Lightning {lightning:.0f} seq/s, "
          f"ratio {ratio:.3f} ({'meets' if ratio >= 0.95 else 'MISSES'} the target 0.95)")
    result = {"model": cfg.model.name, "batch_size": cfg.train.batch_size,
              "steps": args.steps, "runs": runs, "plain_seq_per_s": plain,
              "lightning_seq_per_s": lightning, "ratio": ratio}
    if not args.no_repro:
        result.update(time_repro())
        print(f"dvc repro of the smoke experiment: {result['smoke_repro_s']} s; "
              f"no-op dvc repro: {result['noop_repro_s']} s")
    print(f"wrote {publish(as_result(result)).relative_to(ROOT)}")


ABOUT = """The train stage's LightningModule in a Lightning Trainer (the loop alone: without
the stage's MLflow logger, checkpoints and callbacks) against a plain PyTorch loop over the same
length-grouped batches, optimiser, schedule and clipping, for the same number of steps,
interleaved (the best of each is kept; target: Lightning at 0.95 of the plain loop or
better); then the wall time of the smoke experiment's `dvc repro` from nothing in a copy
of the repository, and of a no-op `dvc repro` after it. Run again:
`python bench/bench_training.py` (`make bench`)."""


def as_result(result: dict) -> Result:
    rows = [["plain PyTorch loop", round(result["plain_seq_per_s"]), "1.00x"],
            ["Lightning (the train stage's module)", round(result["lightning_seq_per_s"]),
             f"{result['ratio']:.2f}x"]]
    tables = [Table(f"Sequences per second: {result['model']}, batch {result['batch_size']}, "
                    f"{result['steps']} steps", ["loop", "sequences/s", "vs plain"], rows)]
    if "smoke_repro_s" in result:
        tables.append(Table("dvc repro", ["run", "seconds"],
                            [["smoke experiment from nothing", result["smoke_repro_s"]],
                             ["no-op, after it", result["noop_repro_s"]]]))
    return Result("training", "Training loop overhead and pipeline wall time", ABOUT, tables,
                  data=result, summary=[["Lightning's speed vs a plain PyTorch loop",
                                         f"{result['ratio']:.2f}x"]])


if __name__ == "__main__":
    main()
