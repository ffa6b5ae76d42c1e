"""Accuracy and wall time of a configuration, from a clean start.

    python bench/bench_accuracy.py model=lstm                     # one configuration
    python bench/bench_accuracy.py data=ag_news model=lstm

Copies the repository to a temporary directory (so the workspace, its registry and
its outputs are untouched), composes params.yaml with the overrides, and times
`dvc repro evaluate` (collect, preprocess, train, evaluate) from nothing. Prints the
test metrics with the wall times and appends them to bench/results/accuracy.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from repo import ROOT, clone_to, sh


def main() -> None:
    overrides = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        repo = clone_to(Path(tmp) / "repo", overrides)
        started = time.perf_counter()
        sh(repo, "dvc", "repro", "evaluate")
        wall = time.perf_counter() - started
        metrics = json.loads((repo / "reports/metrics.json").read_text())
        train = json.loads((repo / "reports/train.json").read_text())
        profile = json.loads((repo / "data/processed/profile.json").read_text())
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "overrides": overrides,
        "test_rows": metrics["rows"],
        "train_rows": profile["splits"]["train"]["rows"],
        "accuracy": round(metrics["accuracy"], 4),
        "f1_macro": round(metrics["f1_macro"], 4),
        "roc_auc": round(metrics["roc_auc"], 4),
        "ece": round(metrics["ece"], 4),
        "epochs": train["epochs"],
        "train_s": train["wall_time_s"],
        "repro_to_evaluate_s": round(wall, 1),
    }
    print(json.dumps(result))
    out = ROOT / "bench" / "results" / "accuracy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps([*history, result], indent=2))


if __name__ == "__main__":
    main()
