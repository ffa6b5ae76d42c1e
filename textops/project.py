"""Where the project is, and how the commands run its code and speak to the user."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer


def find_root(start: Path | None = None) -> Path:
    """The nearest directory at or above `start` holding dvc.yaml and conf/."""
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").is_file() and (candidate / "conf").is_dir():
            return candidate
    raise fail(f"textops: {here} is not inside a textops project (no dvc.yaml and conf/ "
               "here or above)", code=2)


def enter(root: Path) -> None:
    """Work from the project's root with its own code first on the path, so a copy of
    the repository runs its own pipeline/ and serving/, not the installed ones."""
    os.chdir(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


def set_verbosity(verbose: bool) -> None:
    """After `enter`: the project's own logging rules, for this process and the stages'."""
    from pipeline import logs

    if verbose:  # the stages' processes, which DVC starts, inherit it
        os.environ[logs.VERBOSE_ENV] = "1"
    logs.quiet()


def run_module(module: str, *args: str, env: dict[str, str] | None = None) -> None:
    """`python -m module args` in the project root; its exit status becomes ours."""
    code = subprocess.call([sys.executable, "-m", module, *args],
                           env={**os.environ, **(env or {})})
    if code:
        raise typer.Exit(code)


def run_tool(*cmd: str) -> None:
    """A tool installed beside this Python (dvc, mlflow), by its full path, so that an
    inactive virtual environment still finds it."""
    beside = Path(sys.executable).parent / cmd[0]
    code = subprocess.call([str(beside) if beside.exists() else cmd[0], *cmd[1:]])
    if code:
        raise typer.Exit(code)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `message` as an error and return the exit to raise."""
    typer.secho(message, fg=typer.colors.RED, err=True)
    return typer.Exit(code)
