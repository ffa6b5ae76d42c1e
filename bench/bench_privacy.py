"""The cost of differentially private training: the train stage's loop with
`train.privacy` on against off, per task, as a ratio measured in one run.

    python bench/bench_privacy.py [--steps 60] [--repeats 2] [text] [image]

For each configuration a copy of the repository runs `dvc repro preprocess` (collect
and preprocess, from nothing), then the same model trains for the same number of
steps at the same batch size twice over, interleaved: once as a plain fit, once with
DP-SGD (Poisson-sampled batches, per-example gradients clipped and noised; Opacus).
Examples per second of each, and the private fit's time per epoch at that rate, are
published in bench/results/privacy.json and docs/results/privacy.md. The models:
text's default bidirectional LSTM (trained as Opacus's DPLSTM when private), text's
Transformer, and the image CNN with GroupNorm (BatchNorm cannot be private).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_training import Clock  # noqa: E402
from repo import clone_to, sh  # noqa: E402
from results import Result, Table, measured_on, publish, run_stamp  # noqa: E402

from pipeline import logs, tasks  # noqa: E402
from pipeline.config import Paths, load_params  # noqa: E402
from pipeline.modeling import privacy  # noqa: E402

CONFIGURATIONS = {
    "text-lstm": [],
    "text": ["model=transformer"],
    "image": ["task=image_classification", "model=cnn", "model.norm=group"],
}


class Warm(Clock):
    """Times the training batches after the first: a private fit's one-time setup
    (the noise multiplier's search, Opacus's hooks) runs before the first batch, and
    a plain fit's warm-up in it, neither part of an epoch's cost."""

    def on_train_start(self, trainer, module):
        self.seen, self.started = 0, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 1:
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx >= 1:
            self.seen += len(batch["labels"])


def examples_per_s(cfg, repo: Path, steps: int, private: bool) -> float:
    task = tasks.from_config(cfg)
    torch.manual_seed(cfg.seed)
    module = task.module(cfg, Paths(repo))
    datamodule = task.datamodule(cfg, Paths(repo))
    clock, callbacks = Warm(), []
    if private:  # as the train stage sets it up (pipeline/modeling/training.py)
        datamodule = privacy.PoissonSampling(datamodule)
        callbacks.append(privacy.DifferentialPrivacy(cfg.train.privacy, cfg.train.max_epochs,
                                                     privacy.public_parts(cfg)))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=None if private else cfg.train.gradient_clip_val,
                         callbacks=[clock, *callbacks])
    trainer.fit(module, datamodule=datamodule)
    return clock.seen / clock.seconds


def measure(name: str, overrides: list[str], steps: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        where = run_stamp()  # the code the copy holds
        repo = clone_to(Path(tmp) / "repo", overrides)
        sh(repo, "dvc", "repro", "preprocess")
        cfg = load_params(repo / "params.yaml")
        rows = tasks.from_config(cfg).datamodule(cfg, Paths(repo))
        rows.setup()
        train_rows = len(rows.rows["train"])
        runs = {"plain": [], "private": []}
        for _ in range(repeats):  # interleaved: the machine's speed drifts
            for kind in runs:
                runs[kind].append(examples_per_s(cfg, repo, steps, kind == "private"))
                print(f"privacy: {name} {kind}: {runs[kind][-1]:.0f} examples/s", flush=True)
    plain, private = max(runs["plain"]), max(runs["private"])
    return {"task": name, "overrides": overrides, "model": cfg.model.name,
            "batch_size": cfg.train.batch_size, "steps": steps, "train_rows": train_rows,
            "plain_per_s": round(plain, 1), "private_per_s": round(private, 1),
            "slowdown": round(plain / private, 2),
            "private_epoch_s": round(train_rows / private, 1),
            "plain_epoch_s": round(train_rows / plain, 1), **where}


ABOUT = """The train stage's loop with `train.privacy` on (DP-SGD: Poisson-sampled
batches, per-example gradients clipped and noised, Opacus) against off, on the same
model, processed data (`dvc repro preprocess` from nothing in a copy of the
repository), batch size and number of steps, interleaved; the best of each is kept.
Each is timed over its batches after the first (the private fit's one-time setup, such
as the noise multiplier's search, aside), and the private fit treats public pre-trained
embeddings as the train stage does. Seconds per epoch are the training split's rows at
that rate, validation aside. Run
again: `python bench/bench_privacy.py`."""


def as_result(runs: list[dict]) -> Result:
    rows = [[r["task"], " ".join(r["overrides"]), r["batch_size"], r["train_rows"],
             r["plain_per_s"], r["private_per_s"], r["slowdown"], r["plain_epoch_s"],
             r["private_epoch_s"], r["commit"], measured_on(r)] for r in runs]
    table = Table("Training throughput with and without differential privacy",
                  ["task", "overrides", "batch", "training rows", "plain, examples/s",
                   "private, examples/s", "slowdown", "plain epoch (s)",
                   "private epoch (s)", "commit", "measured on"], rows)
    summary = [[f"private training, {r['task']}: slowdown per epoch", f"{r['slowdown']}x",
                measured_on(r)] for r in runs]
    return Result("privacy", "Differential privacy: the training cost", ABOUT, [table],
                  data={"runs": runs}, summary=summary, merged=True)


def main() -> None:
    logs.quiet()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("tasks", nargs="*", choices=[*CONFIGURATIONS, []],
                        help="measure these again, keep the published others (default: all)")
    args = parser.parse_args()
    runs = [measure(name, CONFIGURATIONS[name], args.steps, args.repeats)
            for name in args.tasks or CONFIGURATIONS]
    published = Path(__file__).parent / "results" / "privacy.json"
    if args.tasks and published.exists():
        earlier = json.loads(published.read_text())["data"]["runs"]
        runs = [r for r in earlier if r["task"] not in args.tasks] + runs
    print(publish(as_result(runs)).read_text())


if __name__ == "__main__":
    main()
