"""Compression report: accuracy against speed and size for bundles of several runs.

    python bench/bench_compression.py --default transformer=models/candidate \\
        teacher=../teacher/models/candidate distilled=../distilled/models/candidate ...

Each NAME=BUNDLE is a bundle directory (a run's `models/candidate`, or any bundle), and
`--default` names the one the others are compared with (today's default model). For
each bundle, in fp32 and int8, on the SST-2 dev texts (the pipeline's test split):
  - test accuracy, through the bundle's own tokenizer and ONNX model;
  - in-process texts per second on one core (onnxruntime with one thread, as each of
    the service's per-core processes runs it; batches of 64 texts of similar length),
    the best of `--rounds` passes, the bundles measured in turn and then in reverse
    order, so that a drift of the machine's speed weighs on all alike;
  - cost per text relative to the default model's int8 (the issue's 1.2x bound), and
    the size of the model file.
Writes reports/compression.json (`dvc metrics show`) and reports/compression_plot.json
(`dvc plots show`: accuracy against texts/s), both committed, since no stage makes
them, and prints the table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import atomic  # noqa: E402
from serving.bundle import MODEL_FILES, Bundle, RuntimeOptions  # noqa: E402

PRECISIONS = ("fp32", "int8")


def dev_set() -> tuple[list[str], np.ndarray]:
    with gzip.open(ROOT / "data/external/sst2/dev.tsv.gz", "rt", encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return [text for text, _ in rows], np.array([int(label) for _, label in rows])


def accuracy(bundle: Bundle, texts: list[str], labels: np.ndarray) -> float:
    names = bundle.label_names  # the data set's 0/1 are negative/positive
    predicted = bundle.predict_logits(texts).argmax(1)
    expected = np.array([names.index(("negative", "positive")[y]) for y in labels])
    return float((predicted == expected).mean())


def one_pass(bundle: Bundle, texts: list[str]) -> float:
    """Texts per second over all `texts`, tokenisation included."""
    started = time.perf_counter()
    bundle.predict_logits(texts, batch_size=64)
    return len(texts) / (time.perf_counter() - started)


def measure(bundles: dict[str, Path], rounds: int) -> dict:
    texts, labels = dev_set()
    loaded = {(name, precision): Bundle.load(path, precision,
                                             RuntimeOptions(intra_op_threads=1))
              for name, path in bundles.items() for precision in PRECISIONS}
    results = {key: {"accuracy": accuracy(bundle, texts, labels), "texts_per_s": 0.0,
                     "model_mb": round(os.path.getsize(bundle.path / MODEL_FILES[key[1]])
                                       / 1e6, 2),
                     "model": bundle.meta["model"], "version": bundle.version}
               for key, bundle in loaded.items()}
    for bundle in loaded.values():  # warm-up
        one_pass(bundle, texts[:128])
    order = list(loaded)
    for round_ in range(rounds):
        for key in order if round_ % 2 == 0 else reversed(order):
            rate = one_pass(loaded[key], texts)
            results[key]["texts_per_s"] = max(results[key]["texts_per_s"], rate)
        print(f"round {round_ + 1}/{rounds} done", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundles", nargs="+", metavar="NAME=BUNDLE")
    parser.add_argument("--default", required=True, metavar="NAME=BUNDLE")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "reports")
    args = parser.parse_args()
    named = dict(arg.split("=", 1) for arg in [args.default, *args.bundles])
    default = args.default.split("=", 1)[0]
    results = measure({name: Path(path) for name, path in named.items()}, args.rounds)
    reference = results[(default, "int8")]["texts_per_s"]
    report, points = {}, []
    print(f"{'model':<28} {'precision':<9} {'accuracy':>8} {'texts/s':>8} "
          f"{'cost vs default':>15} {'MB':>7}")
    for (name, precision), r in results.items():
        r["cost_vs_default_int8"] = round(reference / r["texts_per_s"], 3)
        r["texts_per_s"] = round(r["texts_per_s"], 1)
        report.setdefault(name, {})[precision] = r
        points.append({"model": f"{name} ({precision})", "accuracy": r["accuracy"],
                       "texts_per_s": r["texts_per_s"], "model_mb": r["model_mb"]})
        print(f"{name:<28} {precision:<9} {r['accuracy']:>8.4f} {r['texts_per_s']:>8.0f} "
              f"{r['cost_vs_default_int8']:>14.2f}x {r['model_mb']:>7.1f}")
    report["_measured"] = {"default": default, "rounds": args.rounds,
                           "machine": platform.processor() or platform.machine(),
                           "cores_used": 1, "date": time.strftime("%Y-%m-%d")}
    atomic.write_json(args.out / "compression.json", report)
    atomic.write_json(args.out / "compression_plot.json", points)
    print(json.dumps(report["_measured"]))


if __name__ == "__main__":
    main()
