"""Federated against centralised training on the same data, model and passes over it.

    python bench/bench_federated.py [--clients 10] [--alpha 0.5] [name ...]

Each configuration from a clean copy of the repository: `dvc repro evaluate` (collect,
preprocess, train, evaluate), as bench/bench_accuracy.py measures any configuration.
The federated ones deal Fashion-MNIST's training split to `--clients` clients with
Dirichlet(`--alpha`) label skew (or, `iid`, evenly) and run one local epoch per round
for as many rounds as the centralised fit has epochs (`train.max_epochs`), so every
configuration sees the training rows equally often. Published in bench/results/federated.json and
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
from results import Result, Table, measured_on, publish  # noqa: E402

from pipeline import logs  # noqa: E402

IMAGE = ["task=image_classification"]
# GroupNorm in place of BatchNorm: averaging the running statistics of clients that
# each see a few classes can skew the global model's (Hsieh et al. 2020, "The non-IID
# data quagmire of decentralized machine learning"); each is compared with the
# centralised fit of the same model.
GROUP = ["model.norm=group"]
# sixteen epochs, or rounds (trainer.federated.rounds follows train.max_epochs)
SIXTEEN = ["train.max_epochs=16"]


def configurations(clients: int, alpha: float) -> dict[str, list[str]]:
    federated = ["trainer=federated", f"trainer.federated.clients={clients}",
                 f"trainer.federated.partition.alpha={alpha}"]
    prox = ["trainer.federated.strategy=fedprox"]
    # the same 8 passes as 40 rounds of a fifth of an epoch each: less local drift
    # between averagings, which label skew punishes (Li et al. 2020, "On the
    # convergence of FedAvg on non-IID data")
    short = ["trainer.federated.rounds=40", "train.limit_train_batches=0.2"]
    # With the same passes, a round of ten clients moves the model about as far as one
    # client's local epoch would: a tenth of the centralised fit's steps in all. Two ways
    # to move further per round: momentum on the server's step (Hsu et al. 2019), and
    # smaller local batches (McMahan et al. 2017 train clients on batches of 10-50).
    momentum = ["trainer.federated.strategy=fedavgm"]
    small_batches = ["train.batch_size=32"]
    # Ten clients' averaged local steps move the model about as one step on ten times
    # the batch: local batches of 128 / 10 (16) give a round the centralised fit's steps.
    linear = ["train.batch_size=16"]
    # A balanced softmax in each client's loss (ClassifierModule.loss_logits): local
    # fits learn the classes, not their client's label shares (Zhang et al. 2022). On
    # by default; the other configurations train each client as a centralised fit.
    balanced = ["trainer.federated.balanced_loss=true"]
    # each client's AdamW moments carried from its last round (on by default since
    # measured), and FedExP's last two models averaged (likewise): pinned off where
    # a configuration was measured without them
    carried = ["trainer.federated.carry_optimizer_state=true"]
    fresh = ["trainer.federated.carry_optimizer_state=false"]
    plain = [*federated, "trainer.federated.balanced_loss=false", *fresh]
    # FedExP: the server's step stretched past the clients' average as far as their
    # updates point apart (Jhunjhunwala et al. 2023)
    extrapolated = ["trainer.federated.strategy=fedexp"]
    averaged = ["trainer.federated.average_last_two=true"]
    last = ["trainer.federated.average_last_two=false"]
    # SGD with momentum on the clients in place of AdamW: a client's AdamW starts each
    # round with empty moment estimates, so its first steps are about the full rate in
    # every weight whatever the gradient's size; SGD's step follows the gradient.
    sgd = ["train.optimizer.name=sgd", "train.optimizer.momentum=0.9", "train.lr=0.05",
           "train.weight_decay=5.0e-4"]
    ours = [*IMAGE, *federated, *linear, *balanced]  # the measured best's base
    return {"centralised": IMAGE,
            "fedavg": [*IMAGE, *plain],
            "fedavg-short-rounds": [*IMAGE, *plain, *short],
            "fedprox": [*IMAGE, *plain, *prox],
            "fedavgm": [*IMAGE, *plain, *momentum],
            "fedavg-batch32": [*IMAGE, *plain, *small_batches],
            "fedavg-batch16": [*IMAGE, *plain, *linear],
            "fedavg-balanced": [*IMAGE, *federated, *balanced, *fresh],
            "fedavg-batch16-balanced": [*ours, *fresh],
            "fedavg-batch16-balanced-sgd": [*ours, *fresh, *sgd],
            "fedavg-batch16-balanced-carried": [*ours, *carried],
            "fedexp-batch16-balanced": [*ours, *fresh, *extrapolated, *last],
            "fedexp-batch16-balanced-carried": [*ours, *carried, *extrapolated, *last],
            "fedexp-batch16-balanced-carried-averaged": [*ours, *carried, *extrapolated,
                                                         *averaged],
            "fedexp-batch16-balanced-carried-averaged-short-rounds": [
                *ours, *carried, *extrapolated, *averaged, *short],
            # half the local rate: batches of 16 take eight times the steps of 128 at
            # the rate chosen for 128, and every step drifts a skewed client further
            "fedexp-batch16-balanced-carried-averaged-half-rate": [
                *ours, *carried, *extrapolated, *averaged, "train.lr=1.0e-3"],
            # ... and twice it: half measured lower on validation
            "fedexp-batch16-balanced-carried-averaged-double-rate": [
                *ours, *carried, *extrapolated, *averaged, "train.lr=4.0e-3"],
            # SCAFFOLD's control variates on top (control.py): each local step
            # corrected toward the federation's, against the skew's drift
            "fedexp-batch16-balanced-carried-averaged-controlled": [
                *ours, *carried, *extrapolated, *averaged,
                "trainer.federated.control_variates=true"],
            "fedavg-batch16-balanced-carried-controlled": [
                *ours, *carried, "trainer.federated.control_variates=true"],
            # the rows dealt out evenly, no label skew: how much of the gap is the skew's
            "fedavg-batch16-iid": [*IMAGE, *plain, *linear,
                                   "trainer.federated.partition.by=iid"],
            "fedexp-batch16-balanced-carried-averaged-iid": [
                *ours, *carried, *extrapolated, *averaged,
                "trainer.federated.partition.by=iid"],
            # twice the passes, centralised and federated alike: how the gap moves
            # with the training both get
            "centralised-16-passes": [*IMAGE, *SIXTEEN],
            "fedexp-batch16-balanced-carried-averaged-16-passes": [
                *ours, *carried, *extrapolated, *averaged, *SIXTEEN],
            "centralised-group": [*IMAGE, *GROUP],
            "fedavg-group": [*IMAGE, *GROUP, *plain],
            "fedprox-group": [*IMAGE, *GROUP, *plain, *prox]}


def skewed(run: dict) -> bool:
    """Whether `run` is federated over label-skewed clients (what the summary is about)."""
    overrides = run["overrides"]
    return "trainer=federated" in overrides and \
        "trainer.federated.partition.by=iid" not in overrides


def baseline(name: str) -> str:
    """The centralised configuration a federated one is compared with: the same model,
    the same passes over the data."""
    for suffix in ("-group", "-16-passes"):
        if name.endswith(suffix):
            return "centralised" + suffix
    return "centralised"


ABOUT = """Each configuration from a clean copy of the repository: `dvc repro evaluate`
(collect, preprocess, train, evaluate), timed; test accuracy on Fashion-MNIST's own
test set, which neither training nor the choice of round saw. The federated runs
(`trainer=federated`, simulation mode) deal the training split to clients with
Dirichlet label skew and train one local epoch per round, as many rounds as the
centralised fit's epochs: the same passes over the data (or, `short-rounds`, five
times the rounds on a fifth of each client's rows each; `fedavgm`, momentum on the
server's step; `batch32` and `batch16`, local batches of 32 or 16 instead of 128;
`balanced`, a balanced softmax in each client's loss, which the others train without
(`trainer.federated.balanced_loss`, on by default since those were measured); `sgd`,
clients on SGD with momentum (rate 0.05) instead of AdamW; `fedexp`, the server's
step stretched past the average as far as the clients' updates disagree (`averaged`:
the model handed on is the average of its last two); `carried`, each client's AdamW
moments carried from its last round (carrying, and FedExP's averaging, on by default
since measured); `half-rate` and `double-rate`, the local learning rate (`train.lr`)
halved or doubled; `controlled`, SCAFFOLD's control variates; `iid`,
the rows dealt out evenly, without label skew; `16-passes`, sixteen epochs or rounds
instead of eight). Each is compared with the centralised fit of the same model at
the same passes: the default CNN (BatchNorm) and the CNN with
GroupNorm (`model.norm=group`), whose statistics are per example and need no
averaging across clients. Wall times are in the JSON
only: these runs shared the machine with other work. Run again:
`python bench/bench_federated.py`."""


def as_result(runs: list[dict]) -> Result:
    by_name = {r["name"]: r for r in runs}
    rows = []
    for r in runs:
        central = by_name.get(baseline(r["name"]))
        gap = "" if central is None or central is r else round(
            r["accuracy"] - central["accuracy"], 4)
        rows.append([r["name"], " ".join(r["overrides"]), r["accuracy"], gap,
                     r["val_accuracy"], r["f1_macro"], r["epochs"], r["commit"],
                     measured_on(r)])
    table = Table("Test accuracy, federated and centralised",
                  ["configuration", "overrides", "test accuracy",
                   "against centralised (same model)", "validation accuracy", "macro F1",
                   "epochs or rounds", "commit", "measured on"], rows)
    # The configuration the summary reports, one per number of passes, is chosen on
    # validation accuracy, never on the test accuracy it then shows.
    candidates = sorted((r for r in runs if skewed(r) and baseline(r["name"]) in by_name),
                        key=lambda r: r["val_accuracy"])
    summary = []
    for passes in sorted({by_name[baseline(r["name"])]["epochs"] for r in candidates}):
        same = [r for r in candidates if by_name[baseline(r["name"])]["epochs"] == passes]
        best = same[-1]
        summary.append([
            f"federated test accuracy against centralised, Fashion-MNIST, "
            f"{best['clients']} clients, Dirichlet {best['alpha']}, {passes} passes "
            f"({best['name']}, the best on validation of {len(same)})",
            f"{best['accuracy'] - by_name[baseline(best['name'])]['accuracy']:+.4f}",
            measured_on(best)])
    return Result("federated", "Federated training: accuracy against centralised", ABOUT,
                  [table], data={"runs": runs}, summary=summary, merged=True)


def main() -> None:
    logs.quiet()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("names", nargs="*", choices=[*configurations(10, 0.5), []],
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
