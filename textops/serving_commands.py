"""`textops deploy`, `undeploy`, `serve` and `predict`: the model answering, over HTTP
or over files."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from textops.project import fail, run_module, run_tool

PORT = typer.Option(8000, "--port", "-p", help="the port to answer on (127.0.0.1)")
RUN_DIR = typer.Option(Path("run"), "--run-dir", help="where the service's pid and log go")


def deploy(port: int = PORT,
           runtime: str = typer.Option("auto", "--runtime",
                                       help="auto (a Docker or Podman container when one "
                                            "works, else a local process), docker, podman, "
                                            "process"),
           allow_other_data: bool = typer.Option(
               False, "--allow-other-data",
               help="serve the champion even when it was trained on another data set or "
                    "task than the pipeline's"),
           repro: bool = typer.Option(True, "--repro/--no-repro",
                                      help="bring the pipeline up to date first"),
           run_dir: Path = RUN_DIR) -> None:
    """Bring the pipeline up to date and serve the champion (models/current). Says when
    the model just trained was refused at the gate, why, and what is served instead.
    The champion's signature is verified with the deploy stage's public key
    (deploy.signing_key + .pub) first: an altered bundle is not served.

    Examples:

      textops deploy

      textops deploy --port 8080 --runtime process
    """
    from pipeline.config import Paths, load_params
    from pipeline.tracking.signing import key_paths
    from textops.deploy_check import check

    if repro:
        run_tool("dvc", "repro")
    cfg = load_params()
    verdict = check(cfg, Paths(), allow_other_data)
    for line in verdict.notices:
        typer.secho(line, fg=typer.colors.YELLOW if verdict.refused_model else None,
                    bold=verdict.refused_model, err=True)
    if verdict.refusal:
        raise fail(f"deploy: {verdict.refusal}", code=2)
    _, public_key = key_paths(cfg, Paths())
    if not public_key.is_file():  # never serve unverified because a key went missing
        raise fail(f"deploy: no public key at {public_key} to verify models/current with; "
                   "the deploy stage makes the key pair and signs what it promotes "
                   "(`dvc repro --force --single-item deploy`)", code=2)
    run_module("ops.control", "up", "--bundle", "models/current", "--port", str(port),
               "--run-dir", str(run_dir), "--runtime", runtime, "--public-key",
               str(public_key))


def undeploy(run_dir: Path = RUN_DIR) -> None:
    """Stop the service or container `textops deploy` started (safe when none runs).

    Examples:

      textops undeploy
    """
    run_module("ops.control", "down", "--run-dir", str(run_dir))


def serve(bundle: str = typer.Option("models/current", "--bundle", "-b",
                                     help="a bundle directory or models:/NAME@ALIAS"),
          port: int = PORT) -> None:
    """Run the service in the foreground (Ctrl-C stops it).

    Examples:

      textops serve

      textops serve --bundle models:/sst2-classifier@champion --port 8080
    """
    run_module("serving", env={"TEXTOPS_BUNDLE": bundle, "TEXTOPS_PORT": str(port)})


def predict(source: Path = typer.Argument(..., metavar="INPUT", exists=True,
                                          help="csv, tsv, jsonl or parquet (gzip too); for "
                                               "an image bundle, a folder of images or a "
                                               "table of their paths"),
            out: Path = typer.Option(..., "--out", "-o", help="the output file; its suffix "
                                     "picks the format"),
            model: str = typer.Option("models/current", "--model", "-m",
                                      help="a bundle directory or models:/NAME@ALIAS"),
            column: str = typer.Option(None, "--column", "-c", help="the text column "
                                       "(default: the bundle's, else text, else sentence); "
                                       "image paths: default path, else file"),
            workers: int = typer.Option(None, "--workers", "-w", min=1,
                                        help="processes (default: one per core)"),
            on_error: str = typer.Option("fail", "--on-error",
                                         help="fail: stop on a bad row, write nothing; "
                                              "report: write the good rows and OUT.errors.jsonl"),
            ) -> None:
    """Predict over a file with a bundle or a registered model: the service's answers,
    every core busy, written atomically.

    Examples:

      textops predict data/external/sst2/dev.tsv.gz --out predictions.csv

      textops predict reviews.jsonl -o labelled.parquet -m models:/sst2-classifier@champion

      textops predict photos/ -o labels.csv -m models:/fashion_mnist-classifier@champion
    """
    from serving.batch import BatchError, predict_file

    if on_error not in ("fail", "report"):
        raise typer.BadParameter("fail or report", param_hint="--on-error")
    if model.startswith("models:/") and "MLFLOW_TRACKING_URI" not in os.environ:
        from pipeline.config import load_params, tracking_uri

        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri(load_params())  # the project's
    try:
        summary = predict_file(source, out, model, column=column, workers=workers,
                               on_error=on_error)
    except BatchError as err:
        raise fail(f"predict: {err}") from err
    typer.echo(f"predict: {summary.rows:,} rows in {summary.seconds:.1f} s "
               f"({summary.texts_per_s:,.0f}/s), {summary.bad_rows} bad -> {summary.out}")


COMMANDS = [deploy, undeploy, serve, predict]
