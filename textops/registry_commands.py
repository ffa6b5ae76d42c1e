"""`textops promote`, `rollback`, `history`, `challenge`, `decide` and `clear-stop`: which
registered version is the champion, and which challenges it."""

from __future__ import annotations

import os

import typer

from textops.project import fail


def registry():
    """The registry module with MLflow pointed at the project's tracking server."""
    import mlflow

    from pipeline.config import Paths, load_params, tracking_uri
    from pipeline.tracking import registry as module

    cfg = load_params()
    mlflow.set_tracking_uri(tracking_uri(cfg))
    return module, cfg.deploy.model_name, Paths()


def announce(name: str, version: str, paths) -> None:
    typer.echo(f"{name} champion is now v{version}; "
               f"{paths.current} -> {os.readlink(paths.current)}")


REASON = typer.Option("", "--reason", help="why, for the audit trail (textops history)")


def promote(version: str = typer.Argument(..., help="the registry version, e.g. 3"),
            force: bool = typer.Option(False, "--force", help="promote a version the gate "
                                       "refused"),
            reason: str = REASON) -> None:
    """Make a registered version the champion and models/current (a running service
    that follows the champion switches to it).

    Examples:

      textops history          # find the version

      textops promote 3 --reason "better on last week's labels"
    """
    module, name, paths = registry()
    try:
        module.promote_version(name, version, paths, force, reason=reason)
    except module.RegistryError as err:
        raise fail(f"promote: {err}") from err
    announce(name, version, paths)


def rollback(version: str = typer.Argument(None, help="a version to return to (default: "
                                           "the blessed one before the champion)"),
             reason: str = REASON) -> None:
    """Move the champion and models/current back.

    Examples:

      textops rollback         # to the previous blessed version

      textops rollback 2 --reason "complaints since v3"
    """
    module, name, paths = registry()
    try:
        if version is None:
            version = module.rollback(name, paths, reason=reason)
        else:
            module.promote_version(name, version, paths, kind="rollback", reason=reason)
    except module.RegistryError as err:
        raise fail(f"rollback: {err}") from err
    announce(name, version, paths)


def history() -> None:
    """Every registered version of the pipeline's model, newest first: its gate verdict,
    accuracy, and which is the champion; then the audit trail: every move of the
    champion and challenger aliases, and every canary stop cleared (`canary-stop`):
    when, from and to which version, who or what moved it, and why.

    Examples:

      textops history

      textops run data=ag_news && textops history   # the AG News model's versions
    """
    module, name, _ = registry()
    rows = module.history(name)
    if not rows:
        raise fail(f"history: {name} has no registered version yet", code=1)
    typer.echo(f"{name}:")
    for row in rows:
        marks = ["champion" if row["champion"] else "",
                 "blessed" if row["blessed"] else "refused",
                 "rolled back from" if row["rolled_back"] else ""]
        typer.echo(f"  v{row['version']:<4} {row['registered']}  accuracy "
                   f"{row['accuracy'] or '-':<7} bundle {row['bundle'] or '-'}  "
                   + ", ".join(m for m in marks if m))
    moves = module.moves(name)
    if moves:
        typer.echo("moves of the aliases:")
    for move in moves:
        typer.echo(f"  {move['moved_at'][:19]}Z  {move['alias']}: "
                   f"v{move['from_version'] or '-'} -> v{move['to_version'] or '-'}  "
                   f"{move['kind']} by {move['actor']}: {move['reason'] or '-'}")


def challenge(version: str = typer.Argument(..., help="the registry version, e.g. 4"),
              reason: str = REASON) -> None:
    """Make a registered version the challenger: a service started with
    TEXTOPS_CHALLENGER=models:/<name>@challenger scores it in shadow beside the
    champion, and `textops decide` weighs the two on the labels that come back.

    Examples:

      textops challenge 4 --reason "retrained on November's feedback"
    """
    from pipeline.tracking.challenger import set_challenger

    module, name, _ = registry()
    try:
        set_challenger(name, version, reason=reason)
    except module.RegistryError as err:
        raise fail(f"challenge: {err}") from err
    typer.echo(f"{name} challenger is now v{version}")


LOG = typer.Option(None, "--log", help="the prediction log's URL (default: "
                   "TEXTOPS_PREDICTION_LOG, else retrain.prediction_log)")


def log_failure(command: str, log_url: str, err: Exception) -> Exception:
    """The error to exit with for `err` from the prediction log's database: a message
    naming the log, not a traceback (anything else is raised as it is)."""
    from serving.predlog.store import redacted

    if type(err).__module__.split(".")[0] not in ("sqlite3", "psycopg2"):
        raise err
    return fail(f"{command}: the prediction log {redacted(log_url)}: "
                f"{type(err).__name__}: {err}")


def decide(log: str = LOG,
           dry_run: bool = typer.Option(False, "--dry-run", help="decide and record, move "
                                        "nothing")) -> None:
    """Weigh the challenger against the champion on production labels (shadow mode's
    paired answers) with the sequential test of conf/promotion/, and act: promote it,
    retire it, or keep collecting. Safe to run after every label or on a schedule.

    Examples:

      textops decide --dry-run

      textops decide           # e.g. from cron, every few minutes
    """
    from omegaconf import OmegaConf

    from pipeline.config import load_params
    from pipeline.data.feedback import default_log_url
    from pipeline.promotion.controller import check

    module, name, paths = registry()
    cfg = load_params()
    log_url = log or default_log_url(cfg)
    from serving.predlog.store import PredictionLogError

    try:
        result = check(name, OmegaConf.to_container(cfg.promotion), log_url, paths,
                       act=not dry_run)
    except (module.RegistryError, PredictionLogError) as err:
        raise fail(f"decide: {err}") from err
    except Exception as err:
        raise log_failure("decide", log_url, err) from err
    if result["outcome"] is None:
        typer.echo(f"decide: nothing to decide: {result['reason']}")
        return
    moved = " (acted)" if result["acted"] else ""
    typer.echo(f"decide: v{result['challenger']} against champion v{result['champion']}: "
               f"{result['outcome']}{moved}: {result['reason']}")


def clear_stop(version: str = typer.Argument(..., help="the registry version, e.g. 4"),
               log: str = LOG, reason: str = REASON) -> None:
    """Clear the stop of a version's canary, which the service's guards (failures,
    p99) recorded in the prediction log: a stop stands, and no service runs that
    version's canary, until a person says the trip was not the model's fault (a
    node under load, a dependency down). Then the services run its canary again on
    their next watch tick while it is the challenger (`textops challenge` it again if
    `textops decide` retired it). The clearing goes to the audit trail (`textops
    history`) with the stop's reason.

    Examples:

      textops clear-stop 4 --reason "p99 tripped while the node was draining"
      textops challenge 4 --reason "canary again after the node's drain"
    """
    from pipeline.config import load_params
    from pipeline.data.feedback import default_log_url
    from pipeline.promotion.controller import clear_canary_stop
    from pipeline.tracking.audit import actor
    from serving.predlog.store import PredictionLogError

    module, name, _ = registry()
    log_url = log or default_log_url(load_params())
    try:
        why = clear_canary_stop(name, version, log_url, actor("clear-stop"),
                                reason or "by hand")
    except (module.RegistryError, PredictionLogError) as err:
        raise fail(f"clear-stop: {err}") from err
    except Exception as err:
        raise log_failure("clear-stop", log_url, err) from err
    typer.echo(f"{name} v{version}: its canary stop is cleared (it was: {why})")


COMMANDS = [promote, rollback, history, challenge, decide, clear_stop]
