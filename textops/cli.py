"""`textops`: the command line. Each subcommand lives in the module of its concern; this
one builds the app, finds the project and sets how much is said."""

from __future__ import annotations

import typer

from textops import (
    label_commands,
    loop_commands,
    pipeline_commands,
    registry_commands,
    serving_commands,
)
from textops.project import enter, find_root, set_verbosity

app = typer.Typer(
    name="textops",
    help="From a data set to a monitored model served over HTTP: run the pipeline, deploy, "
         "predict over files, promote, retrain, tune and report. Run inside the project "
         "(any directory below the one holding dvc.yaml).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # reflows the docstrings; blank lines part paragraphs
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v",
                                      help="Say more: dependencies' logs and warnings too.")
         ) -> None:
    enter(find_root())  # first: what follows imports the project's code
    set_verbosity(verbose)


for module in (pipeline_commands, serving_commands, registry_commands, loop_commands,
               label_commands):
    for command in module.COMMANDS:
        app.command(**getattr(command, "cli", {}))(command)


if __name__ == "__main__":
    app()
