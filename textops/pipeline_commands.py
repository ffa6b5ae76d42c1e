"""`textops run`, `tune` and `report`: the pipeline and what it produced."""

from __future__ import annotations

from pathlib import Path

import typer

from textops.project import fail, run_module, run_tool

OVERRIDES = typer.Argument(None, help="Hydra overrides of conf/, e.g. model=transformer "
                                      "data=ag_news train.lr=1e-3")


def run(overrides: list[str] = OVERRIDES,
        force: bool = typer.Option(False, "--force", help="rerun every stage, even those "
                                   "up to date"),
        stage: str = typer.Option(None, "--stage", help="run up to this stage only, "
                                  "e.g. evaluate")) -> None:
    """Compose params.yaml from conf/ and OVERRIDES, then run the stages that are out of
    date (dvc repro). Without overrides: the defaults (SST-2, the LSTM).

    Examples:

      textops run                                 # the defaults

      textops run data=ag_news                    # another bundled data set

      textops run data=files                      # your own CSV (as shipped: an example)

      textops run model=transformer --stage evaluate
    """
    run_module("pipeline.config", *(overrides or []))
    run_tool("dvc", "repro", *(["--force"] if force else []), *([stage] if stage else []))


def tune(overrides: list[str] = OVERRIDES,
         storage: str = typer.Option(None, "--storage", help="an SQLAlchemy URL holding the "
                                     "study, shared by workers on several machines "
                                     "(sqlite:///tune.db, postgresql://...)"),
         workers: int = typer.Option(1, "--workers", min=1, help="worker processes here"),
         trials: int = typer.Option(None, "--trials", min=1, help="trials in all (default: "
                                    "tune.trials)"),
         study: str = typer.Option(None, "--study", help="the study's name in --storage")
         ) -> None:
    """Search hyperparameters with Optuna (the space: tune.space in conf/); the best
    configuration becomes conf/experiment/tuned.yaml and params.yaml.

    Examples:

      textops tune --workers 2

      textops tune --storage postgresql://user@db/optuna --workers 4   # on every machine
    """
    from pipeline.loops import tune as tuning

    args = [*(["--storage", storage] if storage else []), "--workers", str(workers),
            *(["--trials", str(trials)] if trials else []),
            *(["--study", study] if study else []), *(overrides or [])]
    run_tool("dvc", "repro", "preprocess")
    tuning.main(args)


def report(out: Path = typer.Option(Path("reports/report.html"), "--out", "-o",
                                    help="the HTML file to write"),
           run_id: str = typer.Option(None, "--run", help="an MLflow run id: report that "
                                      "run's artifacts instead of the workspace's reports/")
           ) -> None:
    """One self-contained HTML page for a run: metrics, plots, the gate's verdict, the
    data profile and leakage, the model card. Open it in any browser.

    Examples:

      textops report                    # the pipeline's latest outputs

      textops report --run 4f8084fb...  -o run.html
    """
    from pipeline.reporting.report import build_report

    try:
        written = build_report(Path.cwd(), out, run_id)
    except (FileNotFoundError, LookupError, ValueError) as err:
        raise fail(f"report: {err}") from err
    typer.echo(f"report: {written}")


COMMANDS = [run, tune, report]
