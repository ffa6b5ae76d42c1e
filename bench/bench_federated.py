"""Federated against centralised training on the same data, model and passes over it.

    python bench/bench_federated.py [--clients 10] [--alpha 0.5] [name ...]

Each configuration from a clean copy of the repository: `dvc repro evaluate` (collect,
preprocess, train, evaluate), as bench/bench_accuracy.py measures any configuration.
The federated ones deal Fashion-MNIST's training split to `--clients` clients with
Dirichlet(`--alpha`) label skew and run one local epoch per round for as many rounds
as the centralised fit has epochs (`train.max_epochs`), so every configuration sees
the training rows equally often. Published in bench/results/federated.json and
docs/results/federated.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_accuracy import measure  # noqa: E402
from results import Result, Table, publish  # noqa: E402

from pipeline import logs  # noqa: E402

IMAGE = ["task=image_classification"]


def configurations(clients: int, alpha: float) -> dict[str, list[str]]:
    federated = [*IMAGE, "trainer=federated", f"trainer.federated.clients={clients}",
                 f"trainer.federated.partition.alpha={alpha}"]
    return {"centralised": IMAGE,
            "fedavg": federated,
            "fedprox": [*federated, "trainer.federated.strategy=fedprox"]}


ABOUT = """Each configuration from a clean copy of the repository: `dvc repro evaluate`
(collect, preprocess, train, evaluate), timed; test accuracy on Fashion-MNIST's own
test set, which neither training nor the choice of round saw. The federated runs
(`trainer=federated`, simulation mode) deal the training split to clients with
Dirichlet label skew and train one local epoch per round, as many rounds as the
centralised fit's epochs: the same passes over the data. Wall times are in the JSON
only: these runs shared the machine with other work. Run again:
`python bench/bench_federated.py`."""


def as_result(runs: list[dict]) -> Result:
    central = next((r for r in runs if r["name"] == "centralised"), None)
    rows = []
    for r in runs:
        gap = "" if central is None else round(r["accuracy"] - central["accuracy"], 4)
        rows.append([r["name"], " ".join(r["overrides"]), r["accuracy"], gap,
                     r["val_accuracy"], r["f1_macro"], r["epochs"], r["commit"]])
    table = Table("Test accuracy, federated and centralised",
                  ["configuration", "overrides", "test accuracy", "against centralised",
                   "validation accuracy", "macro F1", "epochs or rounds", "commit"], rows)
    summary = [[f"federated ({r['name']}, {r['clients']} clients, Dirichlet "
                f"{r['alpha']}) against centralised, Fashion-MNIST",
                f"{r['accuracy'] - central['accuracy']:+.4f}"]
               for r in runs if central is not None and r["name"] != "centralised"]
    return Result("federated", "Federated training: accuracy against centralised", ABOUT,
                  [table], data={"runs": runs}, summary=summary)


def main() -> None:
    logs.quiet()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("names", nargs="*", choices=["centralised", "fedavg", "fedprox", []],
                        help="measure these again, keep the published others (default: all)")
    args = parser.parse_args()
    chosen = configurations(args.clients, args.alpha)
    runs = []
    for name in args.names or chosen:
        run = {"name": name, "clients": args.clients, "alpha": args.alpha,
               **measure(chosen[name])}
        print(f"federated bench: {name}: test accuracy {run['accuracy']}", flush=True)
        runs.append(run)
    published = Path(__file__).parent / "results" / "federated.json"
    if args.names and published.exists():
        earlier = json.loads(published.read_text())["data"]["runs"]
        runs = [r for r in earlier if r["name"] not in args.names] + runs
    order = list(chosen)
    runs.sort(key=lambda r: order.index(r["name"]))
    print(publish(as_result(runs)).read_text())


if __name__ == "__main__":
    main()
