"""Test accuracy against the privacy budget: epsilon in {1, 3, 8} and without
differential privacy, on Fashion-MNIST and SST-2.

    python bench/bench_privacy_accuracy.py [--epochs N] [data ...] [--budgets 1 3 8 inf]
                                           [--repeats N]

Per data set, one clean copy of the repository runs `dvc repro preprocess` (from
nothing), then for each budget composes params.yaml with it and runs `dvc repro
evaluate` (train and evaluate again, on the same processed data). At every budget the
data set's private recipe trains, the same model, epochs and batch size, whose noise
multiplier the accountant derives from the budget: Fashion-MNIST's are
experiment=private_images and experiment=private_images_scatter (Tramer & Boneh 2021's
end-to-end CNN and ScatterNet + linear); SST-2's are the Transformer, since the
default LSTM trains as Opacus's DPLSTM at a small fraction of the speed
(bench/bench_privacy.py), and experiment=private_text, a linear probe on frozen
MiniLM's pooled layers (and on its last layer alone). "inf" is the data set's
non-private default, what the private model gives up accuracy against. --epochs
overrides the private recipe's. A private fit draws its batches and noise from the
operating system's randomness (pipeline/modeling/privacy.py), so two runs of one budget
differ: --repeats trains each private budget that many times, and the page shows their
mean and each run (the seeded non-private default repeats itself and runs once).
Published in bench/results/privacy_accuracy.json and docs/results/privacy_accuracy.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from repo import clone_to, sh  # noqa: E402
from results import Plot, Result, Table, measured_on, publish, run_stamp  # noqa: E402

from pipeline import logs  # noqa: E402

# Per data set and recipe: the private recipe's overrides, and the non-private
# default's (None: the data set's other recipe measures it).
DATA_SETS = {
    "fashion_mnist": (["task=image_classification", "experiment=private_images"],
                      ["task=image_classification"]),
    "fashion_mnist_scatternet": (["task=image_classification",
                                  "experiment=private_images_scatter"], None),
    "sst2": (["model=transformer"], []),
    "sst2_minilm_last_layer": (["experiment=private_text", "model.pool=last"], None),
    "sst2_minilm_probe": (["experiment=private_text"], None),
}
# Each data set's best recipe, whose figures the README's summary shows
HEADLINE = ("fashion_mnist_scatternet", "sst2_minilm_probe")


def measure(name: str, recipe: list[str], default: list[str] | None, epochs: int | None,
            budgets: list[float | None], repeats: int = 1):
    """Each budget's runs (`repeats` of a private one), as they finish."""
    if default is None:
        budgets = [b for b in budgets if b is not None]
    if epochs is not None:
        recipe = [*recipe, f"train.max_epochs={epochs}"]
    with tempfile.TemporaryDirectory() as tmp:
        where = run_stamp()  # the code the copy holds
        repo = clone_to(Path(tmp) / "repo", recipe)
        sh(repo, "dvc", "repro", "preprocess")
        ran: set[float | None] = set()
        for epsilon in [b for b in budgets for _ in range(1 if b is None else repeats)]:
            if epsilon is None:
                overrides = default
            else:
                overrides = [*recipe, "train.privacy.enabled=true",
                             f"train.privacy.epsilon={epsilon}",
                             f"gate.max_epsilon={epsilon}"]
            sh(repo, sys.executable, "-m", "pipeline.config", *overrides)
            started = time.perf_counter()
            if epsilon in ran:  # a repeat: DVC would restore the first run's outputs
                sh(repo, "dvc", "repro", "--force", "--single-item", "train")
            ran.add(epsilon)
            sh(repo, "dvc", "repro", "evaluate")
            metrics = json.loads((repo / "reports/metrics.json").read_text())
            spent = metrics.get("privacy") or {}
            run = {
                "data": name, "overrides": [o for o in overrides if "epsilon" not in o
                                            and o != "train.privacy.enabled=true"],
                "target_epsilon": epsilon,
                "epsilon": spent.get("epsilon"), "delta": spent.get("delta"),
                "noise_multiplier": spent.get("noise_multiplier"),
                "accuracy": round(metrics["accuracy"], 4),
                "f1_macro": round(metrics["f1_macro"], 4),
                "train_and_evaluate_s": round(time.perf_counter() - started, 1),
                **where}
            print(f"privacy accuracy: {name} epsilon {epsilon or 'inf'}: "
                  f"{run['accuracy']}", flush=True)
            yield run


ABOUT = """Per data set, one clean copy of the repository preprocesses from nothing; then for each
privacy budget the data set's private recipe trains, the same model, epochs and batch
size each time (DP-SGD with Opacus: Poisson batches, per-example clipping, the noise
multiplier the accountant derives from epsilon at delta = 1/(10 x training rows)), and
is scored on the test split (Fashion-MNIST's own test set, SST-2's dev set), which
neither training nor the checkpoint's choice saw. A private fit draws its batches and
noise from the operating system's randomness, so runs of one budget differ: where a
budget ran several times (`--repeats`), the table gives their mean and each run, and the
plot the mean. Fashion-MNIST has two recipes, both Tramer & Boneh 2021's published
settings: `experiment=private_images` (fashion_mnist: a small tanh CNN end to end,
batches of 2,048, clipping to 0.1, SGD with momentum, 40 epochs) and
`experiment=private_images_scatter` (fashion_mnist_scatternet: a linear layer over fixed
scattering features, batches of 8,192, clipping to 0.1, SGD with momentum at rate 16, 50
epochs). SST-2's are `model=transformer` (sst2: trained from scratch, 2 epochs) and
`experiment=private_text` (sst2_minilm_probe: a linear layer on the frozen public
all-MiniLM-L6-v2 encoder's token states mean-pooled at every layer, batches of 4,096,
clipping to 0.1, SGD with momentum at rate 8, 30 epochs; sst2_minilm_last_layer: the
same on the last layer's alone, the sentence embedding). "inf" is the data set's
non-private default, trained as `make deploy` trains it. The cost in time is
bench/bench_privacy.py's (wall times here are in the JSON only). Anchor: Tramèr & Boneh
2021, Fashion-MNIST at epsilon 3: 86.0% for the end-to-end CNN, 89.7% for ScatterNet +
linear. Run again: `python bench/bench_privacy_accuracy.py`."""


def order(run: dict) -> tuple:
    """Data sets in DATA_SETS' order, budgets rising, the non-private default last."""
    epsilon = run["target_epsilon"]
    return (list(DATA_SETS).index(run["data"]), epsilon is None, epsilon or 0.0)


def label(epsilon) -> str:
    return "inf" if epsilon is None else f"{epsilon:g}"


def measured(runs: list[dict]) -> list[list[dict]]:
    """The runs grouped by data set and budget (the repeats of one), in `order`."""
    groups: dict[tuple, list[dict]] = {}
    for run in sorted(runs, key=order):
        groups.setdefault((run["data"], run["target_epsilon"]), []).append(run)
    return list(groups.values())


def where(runs: list[dict]) -> str:
    return " and ".join(sorted({measured_on(r) for r in runs}))


def mean(runs: list[dict], field: str) -> float:
    return round(sum(r[field] for r in runs) / len(runs), 4)


def as_result(runs: list[dict]) -> Result:
    groups = measured(runs)
    rows = []
    for group in groups:
        first, spent = group[0], [r["epsilon"] for r in group if r["epsilon"] is not None]
        rows.append([
            first["data"], label(first["target_epsilon"]),
            round(max(spent), 3) if spent else "",  # what the costliest run spent
            "" if first["noise_multiplier"] is None else round(first["noise_multiplier"], 3),
            mean(group, "accuracy"),
            " / ".join(f"{r['accuracy']:.4f}" for r in group) if len(group) > 1 else "",
            mean(group, "f1_macro"), " ".join(first["overrides"]),
            " ".join(sorted({r["commit"] for r in group})), where(group)])
    table = Table("Test accuracy per privacy budget (the mean of the runs)",
                  ["data", "target epsilon", "epsilon spent", "noise multiplier",
                   "test accuracy", "each run", "macro F1", "overrides", "commit",
                   "measured on"], rows)
    series = {}
    for group in groups:  # no privacy drawn at epsilon 16, right of the budgets
        epsilon = group[0]["target_epsilon"]
        series.setdefault(group[0]["data"], []).append(
            [16.0 if epsilon is None else epsilon, mean(group, "accuracy")])
    plot = Plot("Test accuracy against epsilon (16: without differential privacy)", "line",
                "epsilon", "test accuracy", series)
    summary = [[f"test accuracy at epsilon {label(g[0]['target_epsilon'])}, {g[0]['data']}"
                + (f" (mean of {len(g)} runs)" if len(g) > 1 else ""), mean(g, "accuracy"),
                where(g)]
               for g in groups
               if g[0]["target_epsilon"] in (3.0, 8.0) and g[0]["data"] in HEADLINE]
    return Result("privacy_accuracy", "Differential privacy: accuracy against epsilon",
                  ABOUT, [table], plots=[plot], data={"runs": sorted(runs, key=order)},
                  summary=summary, merged=True)


def main() -> None:
    logs.quiet()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=None,
                        help="the private recipe's epochs (default: the recipe's own)")
    parser.add_argument("--budgets", nargs="+", default=["1", "3", "8", "inf"],
                        help="the epsilons to train at (inf: the non-private default)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each private budget (their mean is published)")
    parser.add_argument("data", nargs="*", choices=[*DATA_SETS, []],
                        help="measure these again, keep the published others (default: all)")
    args = parser.parse_args()
    published = Path(__file__).parent / "results" / "privacy_accuracy.json"
    budgets = [None if b == "inf" else float(b) for b in args.budgets]
    fresh: list[dict] = []
    for name in args.data or DATA_SETS:
        for run in measure(name, *DATA_SETS[name], args.epochs, budgets, args.repeats):
            # after each run, in place of the published runs of the same data and budget
            # (this invocation's repeats join it): a later failure keeps them
            earlier = (json.loads(published.read_text())["data"]["runs"]
                       if published.exists() else [])
            key = (run["data"], run["target_epsilon"])
            runs = [r for r in earlier
                    if (r["data"], r["target_epsilon"]) != key or r in fresh] + [run]
            fresh.append(run)
            page = publish(as_result(runs))
            print(f"privacy accuracy: published {page}", flush=True)


if __name__ == "__main__":
    main()
