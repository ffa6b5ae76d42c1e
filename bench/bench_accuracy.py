"""Accuracy and wall time of a configuration, from a clean start.

    python bench/bench_accuracy.py model=lstm                     # one configuration
    python bench/bench_accuracy.py data=ag_news model=lstm

Copies the repository to a temporary directory (so the workspace, its registry and
its outputs are untouched), composes params.yaml with the overrides, and times
`dvc repro evaluate` (collect, preprocess, train, evaluate) from nothing. Prints the
test metrics, the selected checkpoint's accuracy on the validation split (the gap
between the two says whether validation measures what test does), the leakage the
profile found, and the wall times; appends them to bench/results/accuracy.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from repo import ENV, ROOT, clone_to, sh

VALIDATION_ACCURACY = """
import json
import numpy as np
from pipeline import tasks
from pipeline.config import Paths, load_params
from pipeline.data.splits import column, load_splits
paths, task = Paths(), tasks.from_config(load_params())
val = load_splits(paths.processed)["val"]
logits = task.predict_logits(task.load_module(paths.checkpoint), task.model_inputs(val), 256)
print(json.dumps(float((logits.argmax(1) == np.array(column(val, "label"))).mean())))
"""


def validation_accuracy(repo: Path) -> float:
    """The best checkpoint's accuracy on the validation split it was selected on."""
    out = subprocess.run([sys.executable, "-c", VALIDATION_ACCURACY], cwd=repo, env=ENV,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    overrides = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        repo = clone_to(Path(tmp) / "repo", overrides)
        started = time.perf_counter()
        sh(repo, "dvc", "repro", "evaluate")
        wall = time.perf_counter() - started
        metrics = json.loads((repo / "reports/metrics.json").read_text())
        train = json.loads((repo / "reports/train.json").read_text())
        facts = json.loads((repo / "reports/runs/train.json").read_text())
        profile = json.loads((repo / "data/processed/profile.json").read_text())
        val_accuracy = validation_accuracy(repo)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "overrides": overrides,
        "test_rows": metrics["rows"],
        "train_rows": profile["splits"]["train"]["rows"],
        "accuracy": round(metrics["accuracy"], 4),
        "val_accuracy": round(val_accuracy, 4),
        "val_test_gap": round(val_accuracy - metrics["accuracy"], 4),
        "val_leakage": profile["leakage"]["val"]["share"],
        "f1_macro": round(metrics["f1_macro"], 4),
        "roc_auc": round(metrics["roc_auc"], 4),
        "ece": round(metrics["ece"], 4),
        "epochs": train["epochs"],
        "train_s": facts["wall_time_s"],
        "repro_to_evaluate_s": round(wall, 1),
    }
    print(json.dumps(result))
    out = ROOT / "bench" / "results" / "accuracy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps([*history, result], indent=2))


if __name__ == "__main__":
    main()
