"""Compression report: accuracy against speed and size for bundles of several runs.

    python bench/bench_compression.py --default transformer=models/candidate \\
        teacher=../teacher/models/candidate distilled=../distilled/models/candidate ...
    python bench/bench_compression.py --default cnn=../cnn/models/candidate \\
        pruned=../pruned/models/candidate resnet=../resnet/models/candidate

Each NAME=BUNDLE is a bundle directory (a run's `models/candidate`, or any bundle), and
`--default` names the one the others are compared with (today's default model). The
bundles choose the task: all must be text bundles or all image bundles
(`bundle.task.items`), else the script stops naming which is which. For each bundle,
in fp32 and int8:
  - test accuracy, through the bundle's own preprocessing and ONNX model, on
      texts: the SST-2 dev texts (the pipeline's test split), 0/1 = negative/positive;
      images: Fashion-MNIST's test set (conf/data/fashion_mnist.yaml's IDX files), the
      label numbers naming that file's `label_names` in order, as the pipeline does;
  - in-process items per second on one core (onnxruntime with one thread, as each of
    the service's per-core processes runs it; batches of 64), the best of `--rounds`
    passes, the bundles measured in turn and then in reverse order, so that a drift of
    the machine's speed weighs on all alike:
      texts_per_s: raw texts in, tokenisation included (texts of similar length batched);
      images_per_s: what a client sends, each test image as a PNG file (encoded once,
        outside the timing), decoded as the service decodes (`bundle.inputs.pixels`),
        then normalised and run; model_images_per_s: the same pass from the decoded
        pixels on (normalisation and model), so that the decoding every bundle pays
        alike does not hide what a smaller model saves;
  - cost per item relative to the default model's int8 (cost_vs_default_int8, and for
    images model_cost_vs_default_int8 from model_images_per_s), the size of the model
    file, and the bundle's model description (bundle.json's `model`: e.g. a pruned CNN's
    narrower `widths`) and version.
Writes, both committed since no stage makes them, and prints the table:
  texts:  reports/compression.json (`dvc metrics show`) and reports/compression_plot.json
          (`dvc plots show`: accuracy against texts/s);
  images: reports/compression_images.json and reports/compression_images_plot.json
          (accuracy against images/s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# one core means the tokenizer's too: its batch encoding runs a pool on every core unless
# told not to before the library loads
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from pipeline import atomic  # noqa: E402
from serving.bundle import MODEL_FILES, Bundle, RuntimeOptions  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from workload import fashion_mnist_test, sst2_dev  # noqa: E402

PRECISIONS = ("fp32", "int8")
BATCH = 64


def text_pass(bundle: Bundle, texts: list[str]) -> dict[str, float]:
    """Texts per second over all `texts`, tokenisation included."""
    started = time.perf_counter()
    bundle.predict_logits(texts, batch_size=BATCH)
    return {"texts_per_s": len(texts) / (time.perf_counter() - started)}


def image_pass(bundle: Bundle, files: list[bytes]) -> dict[str, float]:
    """Images per second over all `files`: decoding included, and from the decoded
    pixels on (the service decodes, then encodes the pixel arrays and runs them)."""
    started = time.perf_counter()
    pixels = bundle.inputs.pixels(files)
    decoded = time.perf_counter()
    bundle.predict_logits(list(pixels), batch_size=BATCH)
    done = time.perf_counter()
    return {"images_per_s": len(files) / (done - started),
            "model_images_per_s": len(files) / (done - decoded)}


@dataclass(frozen=True)
class Task:
    items: str  # "texts" | "images", as bundle.task.items
    evaluation: str  # the evaluation set, in words
    load: Callable[[], tuple[list, list[str]]]  # -> items, their labels' names
    one_pass: Callable[[Bundle, list], dict[str, float]]  # -> {rate: items per second}
    report: str  # reports/<report>.json and reports/<report>_plot.json
    costs: dict[str, str]  # rate -> its cost key, relative to the default's int8


TASKS = {
    "texts": Task("texts", "SST-2 dev", sst2_dev, text_pass, "compression",
                  {"texts_per_s": "cost_vs_default_int8"}),
    "images": Task("images", "Fashion-MNIST test", fashion_mnist_test, image_pass,
                   "compression_images",
                   {"images_per_s": "cost_vs_default_int8",
                    "model_images_per_s": "model_cost_vs_default_int8"}),
}


def load_bundles(bundles: dict[str, Path]) -> tuple[Task, dict[tuple[str, str], Bundle]]:
    """Every bundle in both precisions on one thread, and their common task."""
    loaded = {(name, precision): Bundle.load(path, precision,
                                             RuntimeOptions(intra_op_threads=1))
              for name, path in bundles.items() for precision in PRECISIONS}
    kinds = {name: loaded[(name, "int8")].task.items for name in bundles}
    if len(set(kinds.values())) != 1:
        shown = ", ".join(f"{name}: {kind}" for name, kind in kinds.items())
        raise SystemExit(f"bundles of different tasks cannot share a report ({shown})")
    kind = next(iter(kinds.values()))
    if kind not in TASKS:
        raise SystemExit(f"no compression report for bundles of {kind}")
    return TASKS[kind], loaded


def accuracy(bundle: Bundle, items: list, truth: list[str]) -> float:
    """Share of `items` whose top logit is the label named `truth`."""
    names = bundle.label_names
    unknown = sorted(set(truth) - set(names))
    if unknown:
        raise SystemExit(f"{bundle.path}: its label names ({', '.join(names)}) lack the "
                         f"evaluation set's {', '.join(unknown)}")
    predicted = bundle.predict_logits(items, batch_size=BATCH).argmax(1)
    expected = np.array([names.index(label) for label in truth])
    return float((predicted == expected).mean())


def measure(task: Task, loaded: dict[tuple[str, str], Bundle], rounds: int) -> dict:
    items, truth = task.load()
    results = {key: {"accuracy": accuracy(bundle, items, truth),
                     **{rate: 0.0 for rate in task.costs},
                     "model_mb": round(os.path.getsize(bundle.path / MODEL_FILES[key[1]])
                                       / 1e6, 2),
                     "model": bundle.meta["model"], "version": bundle.version}
               for key, bundle in loaded.items()}
    for bundle in loaded.values():  # warm-up
        task.one_pass(bundle, items[:2 * BATCH])
    order = list(loaded)
    for round_ in range(rounds):
        for key in order if round_ % 2 == 0 else reversed(order):
            for rate, value in task.one_pass(loaded[key], items).items():
                results[key][rate] = max(results[key][rate], value)
        print(f"round {round_ + 1}/{rounds} done", flush=True)
    return results


def tabulate(task: Task, results: dict, default: str) -> tuple[dict, list[dict]]:
    """The report ({name: {precision: ...}}) and plot points; prints the table."""
    references = {rate: results[(default, "int8")][rate] for rate in task.costs}
    report, points = {}, []
    main = f"{task.items}_per_s"
    print(f"{'model':<28} {'precision':<9} {'accuracy':>8} "
          + " ".join(f"{rate.removesuffix('_per_s') + '/s':>18} {'cost':>6}"
                     for rate in task.costs) + f" {'MB':>7}")
    for (name, precision), r in results.items():
        for rate, cost in task.costs.items():
            r[cost] = round(references[rate] / r[rate], 3)
            r[rate] = round(r[rate], 1)
        report.setdefault(name, {})[precision] = r
        points.append({"model": f"{name} ({precision})", "accuracy": r["accuracy"],
                       main: r[main], "model_mb": r["model_mb"]})
        print(f"{name:<28} {precision:<9} {r['accuracy']:>8.4f} "
              + " ".join(f"{r[rate]:>18.0f} {r[cost]:>5.2f}x"
                         for rate, cost in task.costs.items()) + f" {r['model_mb']:>7.1f}")
    return report, points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundles", nargs="+", metavar="NAME=BUNDLE")
    parser.add_argument("--default", required=True, metavar="NAME=BUNDLE")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "reports")
    args = parser.parse_args()
    named = dict(arg.split("=", 1) for arg in [args.default, *args.bundles])
    default = args.default.split("=", 1)[0]
    task, loaded = load_bundles({name: Path(path) for name, path in named.items()})
    report, points = tabulate(task, measure(task, loaded, args.rounds), default)
    report["_measured"] = {"default": default, "rounds": args.rounds,
                           "evaluated_on": task.evaluation, "batch": BATCH,
                           "machine": platform.processor() or platform.machine(),
                           "cores_used": 1, "date": time.strftime("%Y-%m-%d")}
    atomic.write_json(args.out / f"{task.report}.json", report)
    atomic.write_json(args.out / f"{task.report}_plot.json", points)
    print(json.dumps(report["_measured"]))


if __name__ == "__main__":
    main()
