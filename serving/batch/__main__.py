"""`python -m serving.batch INPUT --out OUTPUT`: see --help."""

from __future__ import annotations

import argparse
import logging
import sys

from serving.batch.readers import BatchError
from serving.batch.runner import BadRowsError, predict_file
from serving.bundle import BundleError

EXAMPLES = """\
examples:
  # SST-2's dev file with the deployed bundle, on every core
  python -m serving.batch data/external/sst2/dev.tsv.gz --out predictions.csv

  # the registry's champion, texts from the `review` column, as parquet
  MLFLOW_TRACKING_URI=sqlite:///mlflow.db python -m serving.batch reviews.jsonl.gz \\
      --model models:/sst2-classifier@champion --column review --out scored.parquet

  # write the good rows, list the bad lines in scored.csv.errors.jsonl
  python -m serving.batch messy.csv --out scored.csv --on-error report

  # an image bundle: every image in a folder (and its subfolders)
  python -m serving.batch photos/ --out labels.csv \\
      --model models:/fashion_mnist-classifier@champion

input formats (from the name): .csv .tsv .jsonl (each also .gz) .parquet
  an image bundle: a folder of .png .jpg .jpeg .gif .bmp .webp files, or a table of
  their paths (relative to the table's folder) in the --column column
output formats (from the name): .csv .tsv .jsonl (each also .gz) .parquet
each output row: line, the input's fields, label, score, p_<class> for every class
  (a folder of images: path, label, score, p_<class>)
exit status: 0 done, 1 bad rows (nothing written), 2 bad arguments, input or model
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving.batch", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Predict every row of a file (or every image of a folder) with a "
                    "model bundle, as the service's /predict would answer each item.")
    p.add_argument("input", help="the file to predict: csv, tsv, jsonl (or .gz), parquet; "
                   "or, for an image bundle, a folder of images")
    p.add_argument("--out", "-o", required=True, help="where the predictions go (written "
                   "atomically: nothing appears unless the run succeeds)")
    p.add_argument("--model", "-m", default="models/current", help="a bundle directory or "
                   "a registry URI models:/<name>@<alias> or models:/<name>/<version> "
                   "(default: %(default)s)")
    p.add_argument("--column", "-c", help="the text column (default: the bundle's, else "
                   "`text`, else `sentence`); for an image bundle, the column of image "
                   "paths (default: `path`, else `file`)")
    p.add_argument("--workers", "-w", type=int, help="worker processes, one core each "
                   "(default: every core)")
    p.add_argument("--batch-size", type=int, default=64, help="texts or images per model call "
                   "(default: %(default)s, as the service)")
    p.add_argument("--precision", choices=("int8", "fp32"), help="the model to run "
                   "(default: the service's, TEXTOPS_PRECISION or int8)")
    p.add_argument("--on-error", choices=("fail", "report"), default="fail",
                   help="bad rows: fail and write nothing (default), or write the rest and "
                   "list them in OUTPUT.errors.jsonl")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="a progress bar (default: when stderr is a terminal)")
    bar.add_argument("--no-progress", dest="progress", action="store_false",
                     help="log lines with rate and ETA instead of a bar")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = predict_file(args.input, args.out, args.model, column=args.column,
                               workers=args.workers, batch_size=args.batch_size,
                               progress=args.progress, precision=args.precision,
                               on_error=args.on_error)
    except BadRowsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (BatchError, BundleError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    errors = f", bad rows listed in {summary.errors}" if summary.bad_rows else ""
    print(f"{summary.out}: {summary.rows} rows, {summary.bad_rows} bad, "
          f"{summary.seconds:.1f} s, {summary.texts_per_s:.0f} rows/s, "
          f"model {summary.model_version}{errors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
