"""The audit trail of the registry's aliases: every move of an alias (deploy's
promotion, `textops promote`, `textops rollback`, a decision on production evidence)
recorded with when, from which version to which, who or what moved it, and why.

MLflow's registry keeps which version holds an alias now, not which held it when
(mlflow/mlflow#2169). Each move is therefore a finished MLflow run of its own in the
`alias-moves` experiment, on the same tracking server as the registry, with the move's
fields as `move.*` tags: a team's shared server keeps one trail for every machine
that deploys, and `textops history` reads it back.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import socket

import mlflow

EXPERIMENT = "alias-moves"
FIELDS = ("model", "alias", "from_version", "to_version", "kind", "actor", "reason",
          "moved_at")


def actor(command: str) -> str:
    """Who moves an alias: the command, and the user (TEXTOPS_ACTOR, where a job
    runs under a service account, else the login) at the machine."""
    user = os.environ.get("TEXTOPS_ACTOR") or getpass.getuser()
    return f"{command} ({user}@{socket.gethostname()})"


def record(client: mlflow.MlflowClient, model: str, alias: str, from_version: str | None,
           to_version: str | None, kind: str, by: str, reason: str,
           evidence: dict | None = None) -> dict:
    """Record one move and return it as `moves` lists it (`to_version` None: the alias
    was taken away). `evidence`: what a decision rested on (counts, statistic,
    interval), kept as JSON."""
    move = {"model": model, "alias": alias, "from_version": from_version,
            "to_version": None if to_version is None else str(to_version), "kind": kind,
            "actor": by, "reason": reason,
            "moved_at": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")}
    if evidence is not None:
        move["evidence"] = evidence
    found = client.get_experiment_by_name(EXPERIMENT)
    experiment = found.experiment_id if found else client.create_experiment(EXPERIMENT)
    tags = {f"move.{key}": "" if value is None else str(value)
            for key, value in move.items() if key != "evidence"}
    if evidence is not None:
        tags["move.evidence"] = json.dumps(evidence, sort_keys=True)
    run = client.create_run(experiment, tags=tags, run_name=f"{model}@{alias}: "
                            f"v{from_version or '-'} -> v{to_version or '-'}")
    client.set_terminated(run.info.run_id)
    return move


def moves(client: mlflow.MlflowClient, model: str) -> list[dict]:
    """Every recorded move of `model`'s aliases, newest first."""
    found = client.get_experiment_by_name(EXPERIMENT)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], f"tags.`move.model` = '{model}'",
                              max_results=10_000)
    listed = []
    for run in runs:
        tags = run.data.tags
        if not tags.get("move.moved_at"):
            continue  # not a move this module recorded
        move = {key: tags.get(f"move.{key}") or None for key in FIELDS}
        if tags.get("move.evidence"):
            move["evidence"] = json.loads(tags["move.evidence"])
        listed.append(move)
    return sorted(listed, key=lambda m: m["moved_at"], reverse=True)
