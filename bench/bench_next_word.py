"""Next-word prediction per configuration, each from a clean start: perplexity and top-k
accuracy beside the Kneser-Ney baseline on the same test tokens, and the wall time of
the whole pipeline up to a served, checked bundle.

    python bench/bench_next_word.py                                # the default
    python bench/bench_next_word.py "" "model=lm_transformer train.lr=1e-3"
    python bench/bench_next_word.py --append --keep-bundles /tmp/b "model=lm_transformer"

Each argument is one configuration: Hydra overrides separated by spaces, applied after
`task=next_word` ("" is the default). For each, the repository is copied to a
temporary directory (the workspace, its registry and its outputs are untouched),
params.yaml is composed, and `dvc repro` (collect, preprocess, train, evaluate, deploy,
serve) is timed from nothing: the task's target is a served model within 15 minutes on
2 cores, at a test perplexity at least 20% below the baseline's. A configuration whose
gate or deploy refuses its model is recorded with the stage's verdict. Publishes
bench/results/next_word.json and docs/results/next_word.md (bench/results.py).
`--keep-bundles DIR` copies each configuration's bundle and best checkpoint to
DIR/<overrides joined by _> (for bench/bench_generation.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from repo import ENV, clone_to
from results import Result, Table, measured_on, publish, run_stamp

STAGES = ("collect", "preprocess", "train", "evaluate", "deploy", "serve")


def read(repo: Path, path: str) -> dict:
    return json.loads((repo / path).read_text())


def verdict(result: subprocess.CompletedProcess) -> str:
    """Why a run stopped: the stage's own refusal (`<stage>: ...` on stderr), else the
    last line of its error output."""
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    refusals = [line for line in errors if line.split(":")[0] in STAGES]
    return (refusals or errors or [f"exit status {result.returncode}"])[-1]


def measure(overrides: list[str], keep: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        where = run_stamp()  # the code the copy holds
        repo = clone_to(Path(tmp) / "repo", ["task=next_word", *overrides])
        started = time.perf_counter()
        run = subprocess.run(["dvc", "repro"], cwd=repo, env=ENV, capture_output=True,
                             text=True)
        wall = time.perf_counter() - started
        if run.returncode != 0 and not (repo / "reports/metrics.json").exists():
            raise RuntimeError(f"{' '.join(overrides)}: {verdict(run)}\n{run.stderr[-3000:]}")
        metrics = read(repo, "reports/metrics.json")
        train, facts = read(repo, "reports/train.json"), read(repo, "reports/runs/train.json")
        profile = read(repo, "data/processed/profile.json")
        if keep is not None and run.returncode == 0:
            dest = keep / ("_".join(overrides) or "defaults")
            shutil.copytree(repo / "models/candidate", dest / "bundle", dirs_exist_ok=True)
            shutil.copy2(repo / "models/checkpoints/best.ckpt", dest / "best.ckpt")
    base = metrics["baseline"]
    return {
        "overrides": overrides,
        "data": profile["data"]["name"],
        "vocabulary": profile["tokenizer"]["vocab_size"],
        "test_tokens": metrics["tokens"],
        "test_unk_rate": round(profile["splits"]["test"]["unk_rate"], 4),
        "perplexity": round(metrics["perplexity"], 2),
        # evaluate's figures on validation: what a configuration is chosen on
        "val_perplexity": round(metrics["validation"]["perplexity"], 2),
        "val_perplexity_per_word": round(metrics["validation"]["perplexity_per_word"], 2),
        "perplexity_per_word": round(metrics["perplexity_per_word"], 2),
        "accuracy": round(metrics["accuracy"], 4),
        "top5_accuracy": round(metrics["top5_accuracy"], 4),
        "baseline": base["name"],
        "baseline_perplexity": round(base["perplexity"], 2),
        "baseline_accuracy": round(base["accuracy"], 4),
        "vs_baseline": round(metrics["perplexity_vs_baseline"], 3),
        "epochs": train["epochs"],
        "train_s": facts["wall_time_s"],
        "repro_s": round(wall, 1),
        "served": "yes" if run.returncode == 0 else f"no: {verdict(run)}",
        **where,
    }


ABOUT = """Each configuration (after `task=next_word`) from a clean copy of the repository:
`dvc repro`, all six stages (collect, preprocess, train, evaluate, deploy, serve),
timed from nothing on this machine. Perplexity is per token of the word-level
tokenizer (per word: the same log-loss over the test text's whitespace-separated
words); the Kneser-Ney trigram is fitted on the same training split and scored on the
same test tokens in the same run. Configurations are compared on validation per
word (a tokenizer's token count differs; its word count does not). The target: test
perplexity at most 0.8 of the baseline's, a served model within 15 minutes. Run again:
`python bench/bench_next_word.py "<overrides>" ...`, one argument per row of the first
column ("" for the defaults)."""


def as_result(runs: list[dict]) -> Result:
    rows = [[" ".join(r["overrides"]) or "(defaults)", r["data"], r["vocabulary"],
             r["test_tokens"], r["perplexity"], r["val_perplexity"],
             r.get("val_perplexity_per_word", ""), r.get("perplexity_per_word", ""),
             r["baseline_perplexity"],
             r["vs_baseline"], r["accuracy"], r["baseline_accuracy"], r["top5_accuracy"],
             r["epochs"], r["train_s"], r["repro_s"], r["served"], r["commit"],
             measured_on(r)] for r in runs]
    table = Table("Test perplexity beside the n-gram baseline, and wall time from nothing",
                  ["overrides", "data", "vocabulary", "test tokens", "test perplexity",
                   "validation perplexity", "validation per word", "test per word",
                   "Kneser-Ney perplexity", "ratio",
                   "top-1 accuracy", "Kneser-Ney top-1", "top-5 accuracy", "epochs",
                   "train (s)", "collect → serve (s)", "served", "commit", "measured on"],
                  rows)
    summary = []  # the README's: the defaults alone (the page has every row)
    for r in runs:
        if not r["overrides"]:
            summary.append([f"next-word test perplexity over Kneser-Ney's, {r['data']}",
                            f"{r['vs_baseline']}x", measured_on(r)])
            if r["served"] == "yes":  # a failed run's time is until its failure
                summary.append(["next-word pipeline from nothing to a served model, s",
                                r["repro_s"], measured_on(r)])
    return Result("next_word", "Next-word prediction: perplexity per configuration", ABOUT,
                  [table], data={"runs": runs}, summary=summary, merged=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configurations", nargs="*", metavar="OVERRIDES")
    parser.add_argument("--append", action="store_true")
    parser.add_argument("--keep-bundles", type=Path, metavar="DIR")
    args = parser.parse_args()
    runs = []
    for overrides in [arg.split() for arg in args.configurations] or [[]]:
        print(f"next_word: {' '.join(overrides) or '(defaults)'} ...", flush=True)
        runs.append(measure(overrides, args.keep_bundles))
        print(f"next_word: {json.dumps(runs[-1])}", flush=True)
    published = Path(__file__).parent / "results" / "next_word.json"
    if args.append and published.exists():
        measured = {tuple(run["overrides"]) for run in runs}
        earlier = json.loads(published.read_text())["data"]["runs"]
        runs = [run for run in earlier if tuple(run["overrides"]) not in measured] + runs
    print(publish(as_result(runs)).read_text())


if __name__ == "__main__":
    main()
