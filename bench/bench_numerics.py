"""Numerics across CPUs: does pinning the CPU kernels make training repeat, and what
does it cost?

In a fresh copy of the repository, the default pipeline's data stages run once; then
the train stage runs once per setting below, each from the same processed data. For
each: the hash of `models/checkpoints` (as dvc.lock records it), whether it equals the
committed dvc.lock's, the best validation score and the wall time, with its ratio to
the unpinned run measured in the same session. Run it on each kind of CPU: a setting
that gives one hash on both kinds makes `dvc.lock` repeat across them.

Writes bench/results/numerics.json and its page, docs/results/numerics.md.

    python bench/bench_numerics.py                 # the three settings
    python bench/bench_numerics.py --only default  # one
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repo import ENV, ROOT, clone_to, sh  # noqa: E402
from results import Result, Table, publish  # noqa: E402

# PyTorch's ATen kernels, MKL's code paths and oneDNN's ISA, each held to one level.
SETTINGS = {
    "default": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "sse4": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE",
             "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
STAGE_OUTPUT = "models/checkpoints"


def output_hash(repo: Path, stage: str, path: str, committed: bool = False) -> str:
    """The md5 of `stage`'s output `path` in the copy's dvc.lock, or (`committed`) in
    the lock git holds at HEAD: a `dvc repro` in the workspace rewrites the file, and
    comparing this machine's hash with itself would say yes whatever the CPU."""
    text = (subprocess.run(["git", "show", "HEAD:dvc.lock"], cwd=repo, check=True,
                           capture_output=True, text=True).stdout
            if committed else (repo / "dvc.lock").read_text())
    lock = yaml.safe_load(text)
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)


def train_once(repo: Path, setting: dict) -> dict:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "train"],
                   cwd=repo, env={**ENV, **setting}, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    report = json.loads((repo / "reports/train.json").read_text())
    return {"checkpoints_md5": output_hash(repo, "train", STAGE_OUTPUT),
            "best_val": round(report["best_score"], 4), "train_s": round(seconds, 1)}


ABOUT = """The train stage of the default pipeline, from the same processed data, once
per kernel setting: the hash DVC records for `models/checkpoints`, whether it equals the
committed `dvc.lock`'s, the best validation score and the wall time against the unpinned
run of the same session. A setting whose hash is the same on both CPU kinds would make
`dvc.lock` repeat across them. Run again: `python bench/bench_numerics.py`."""


def as_result(measured: dict) -> Result:
    rows = [[name, " ".join(f"{k}={v}" for k, v in r["env"].items()) or "(none)",
             r["checkpoints_md5"][:8], "yes" if r["matches_committed"] else "no",
             r["best_val"], r["train_s"], f"{r['ratio']:.2f}x"]
            for name, r in measured["settings"].items()]
    table = Table(f"Committed `{STAGE_OUTPUT}`: `{measured['committed_md5'][:8]}`",
                  ["setting", "environment", STAGE_OUTPUT, "equals the committed",
                   "best validation", "train (s)", "time vs default"], rows)
    return Result("numerics", "Numerics across CPUs", ABOUT, [table], data=measured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(SETTINGS), action="append")
    args = parser.parse_args()
    chosen = args.only or list(SETTINGS)
    if "default" not in chosen:
        chosen.insert(0, "default")  # the ratios' baseline, measured in the same run
    committed = output_hash(ROOT, "train", STAGE_OUTPUT, committed=True)
    result = {"committed_md5": committed, "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        repo = clone_to(Path(tmp) / "repo", [])
        print("numerics: data stages (collect, preprocess) once", flush=True)
        sh(repo, sys.executable, "-m", "dvc", "repro", "transfer")
        for name in chosen:
            print(f"numerics: train with {name} ...", flush=True)
            measured = train_once(repo, SETTINGS[name])
            result["settings"][name] = {"env": SETTINGS[name], **measured,
                                        "matches_committed": measured["checkpoints_md5"]
                                        == committed}
            print(f"numerics: {name}: {measured}", flush=True)
    base = result["settings"]["default"]["train_s"]
    for measured in result["settings"].values():
        measured["ratio"] = measured["train_s"] / base
    print(publish(as_result(result)).read_text())


if __name__ == "__main__":
    main()
