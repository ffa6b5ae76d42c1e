"""Accuracy and wall time of configurations, each from a clean start.

    python bench/bench_accuracy.py                                  # the default
    python bench/bench_accuracy.py "" "data=ag_news" "data=files"   # several, one per argument
    python bench/bench_accuracy.py "model=transformer seed=1"
    python bench/bench_accuracy.py --name image_accuracy "task=image_classification model=mlp"
    python bench/bench_accuracy.py --name image_accuracy --append --keep-bundles /tmp/b \
        "task=image_classification train.prune.channels=0.5"

Each argument is one configuration: Hydra overrides separated by spaces ("" is the
default). For each, the repository is copied to a temporary directory (so the
workspace, its registry and its outputs are untouched), params.yaml is composed with
the overrides, and `dvc repro evaluate` (collect, preprocess, train, evaluate) is timed
from nothing. Records the test metrics, the selected checkpoint's accuracy on the
validation split (the gap between the two says whether validation measures what test
does), the leakage the profile found, and the wall times; publishes them as
bench/results/<name>.json and docs/results/<name>.md (bench/results.py; `--name`,
default `accuracy`: the text configurations; `image_accuracy`: the image ones).

`--serve` times `dvc repro` instead, every stage through deploy and serve: from
nothing to a served model, the figure `make deploy` waits for (the image task's
target: 15 minutes on 2 cores). `--append` keeps the runs already published under
that name whose overrides and stages differ (each run records the commit it was
measured at). `--keep-bundles DIR` also runs
`dvc repro deploy` after the timing and copies each configuration's bundle to
DIR/<overrides joined by _> (for bench/bench_compression.py and bench_serving.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from repo import ENV, clone_to, sh
from results import Result, Table, measured_on, publish, run_stamp

VALIDATION_ACCURACY = """
import json
import numpy as np
from pipeline import tasks
from pipeline.config import Paths, load_params
from pipeline.data.splits import column, load_splits
paths, task = Paths(), tasks.from_config(load_params())
val = load_splits(paths.processed)["val"]
logits = task.predict_logits(task.load_module(paths.checkpoint), task.model_inputs(val, paths), 256)
print(json.dumps(float((logits.argmax(1) == np.array(column(val, "label"))).mean())))
"""


def validation_accuracy(repo: Path) -> float:
    """The best checkpoint's accuracy on the validation split it was selected on."""
    out = subprocess.run([sys.executable, "-c", VALIDATION_ACCURACY], cwd=repo, env=ENV,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(overrides: list[str], keep_bundles: Path | None = None,
            through: str = "evaluate") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        where = run_stamp()  # the code the copy holds
        repo = clone_to(Path(tmp) / "repo", overrides)
        started = time.perf_counter()
        sh(repo, "dvc", "repro", *([] if through == "serve" else [through]))
        wall = time.perf_counter() - started
        deployed = None
        if keep_bundles is not None and through != "serve":
            # A bundle deploy refuses (e.g. int8 agreement under its floor) is a finding
            # about that configuration, not a reason to lose the measurements.
            deployed = subprocess.run(["dvc", "repro", "deploy"], cwd=repo, env=ENV,
                                      capture_output=True, text=True)
        if keep_bundles is not None and (deployed is None or deployed.returncode == 0):
            shutil.copytree(repo / "models/candidate",
                            keep_bundles / ("_".join(overrides) or "defaults"),
                            dirs_exist_ok=True)
        metrics = json.loads((repo / "reports/metrics.json").read_text())
        train = json.loads((repo / "reports/train.json").read_text())
        facts = json.loads((repo / "reports/runs/train.json").read_text())
        profile = json.loads((repo / "data/processed/profile.json").read_text())
        val_accuracy = validation_accuracy(repo)
    return {
        "overrides": overrides,
        "data": profile["data"]["name"],
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
        "through": through,
        "repro_s": round(wall, 1),
        **where,
        **({} if deployed is None else {"deploy": "bundle kept" if deployed.returncode == 0
                                        else "refused: " + last_line(deployed)}),
    }


def last_line(result: subprocess.CompletedProcess) -> str:
    """The stage's own verdict: its last line naming what it refused."""
    lines = [line for line in (result.stdout + result.stderr).splitlines()
             if line.startswith("deploy:")]
    return lines[-1] if lines else f"exit status {result.returncode}"


ABOUT = """Each configuration from a clean copy of the repository: `dvc repro evaluate`
(collect, preprocess, train, evaluate), or `dvc repro` (every stage, through deploy
and serve: from nothing to a served model) where the stages column says
serve, timed. Test metrics are on the configuration's
test split (SST-2: its dev set; Fashion-MNIST: its own test set; never seen in training
or model selection); the validation accuracy is the selected checkpoint's, so a large
gap says validation does not measure what test does. Run again:
`python bench/bench_accuracy.py --name {name} "<overrides>" ...`, one argument per row
of the first column ("" for the defaults)."""


def as_result(runs: list[dict], name: str = "accuracy") -> Result:
    rows = [[" ".join(r["overrides"]) or "(defaults)", r["data"], r["train_rows"],
             r["test_rows"], r["accuracy"], r["val_accuracy"], r["f1_macro"], r["roc_auc"],
             r["ece"], r["epochs"], r["train_s"], f"collect → {stages(r)}", wall_s(r),
             r.get("commit", ""), measured_on(r)] for r in runs]
    table = Table("Test metrics and wall time per configuration",
                  ["overrides", "data", "train rows", "test rows", "test accuracy",
                   "validation accuracy", "macro F1", "ROC-AUC", "ECE", "epochs", "train (s)",
                   "stages", "wall (s)", "commit", "measured on"], rows)
    summary = []
    for r in runs:
        shown = f"{r['data']}" + (f" ({' '.join(r['overrides'])})" if r["overrides"] else "")
        summary.append([f"test accuracy, {shown}", r["accuracy"], measured_on(r)])
        if stages(r) == "serve":
            summary.append([f"from nothing to a served model, s, {shown}", wall_s(r),
                            measured_on(r)])
    title = {"accuracy": "Accuracy per configuration",
             "image_accuracy": "Image classification: accuracy per configuration"}.get(
                 name, f"Accuracy per configuration ({name})")
    return Result(name, title, ABOUT.format(name=name), [table], data={"runs": runs},
                  summary=summary, merged=True)


def stages(run: dict) -> str:
    return run.get("through", "evaluate")


def wall_s(run: dict) -> float:
    return run.get("repro_s", run.get("repro_to_evaluate_s"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configurations", nargs="*", metavar="OVERRIDES")
    parser.add_argument("--name", default="accuracy")
    parser.add_argument("--append", action="store_true")
    parser.add_argument("--keep-bundles", type=Path, metavar="DIR")
    parser.add_argument("--serve", action="store_true",
                        help="time every stage, through deploy and serve")
    args = parser.parse_args()
    through = "serve" if args.serve else "evaluate"
    configurations = [arg.split() for arg in args.configurations] or [[]]
    runs = []
    for overrides in configurations:
        print(f"accuracy: {' '.join(overrides) or '(defaults)'} ...", flush=True)
        runs.append(measure(overrides, args.keep_bundles, through))
        print(f"accuracy: {json.dumps(runs[-1])}", flush=True)
    if args.append:
        published = Path(__file__).parent / "results" / f"{args.name}.json"
        measured = {(tuple(run["overrides"]), stages(run)) for run in runs}
        earlier = []
        if published.exists():
            old = json.loads(published.read_text())
            earlier = [{**run, "commit": run.get("commit", old["stamp"]["commit"][:7])}
                       for run in old["data"]["runs"]]
        runs = [run for run in earlier
                if (tuple(run["overrides"]), stages(run)) not in measured] + runs
    print(publish(as_result(runs, args.name)).read_text())


if __name__ == "__main__":
    main()
