"""The challenger alias: a blessed version scored beside the champion (shadow or
canary, serving/engine/challenger.py) until the evidence from production decides
(pipeline/promotion/controller.py): promoted, or retired. Every move is in the audit
trail (pipeline/tracking/audit.py)."""

from __future__ import annotations

import mlflow
from mlflow.exceptions import MlflowException

from pipeline.tracking import audit
from pipeline.tracking.registry import RegistryError, alias_version

CHALLENGER = "challenger"


def set_challenger(model_name: str, version: str, by: str | None = None,
                   reason: str = "") -> None:
    """Give registered `version` the challenger alias (`textops challenge`); a
    service with TEXTOPS_CHALLENGER=models:/<name>@challenger scores it in shadow."""
    client = mlflow.MlflowClient()
    try:
        found = client.get_model_version(model_name, version)
    except MlflowException:
        raise RegistryError(f"{model_name} has no version {version}") from None
    if found.tags.get("blessed") != "true":
        raise RegistryError(f"{model_name} v{version} was refused at the gate "
                            f"({found.tags.get('gate_reasons') or 'no verdict recorded'})")
    if alias_version(client, model_name) == str(version):
        raise RegistryError(f"{model_name} v{version} is the champion")
    before = alias_version(client, model_name, CHALLENGER)
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    if before is not None and before != str(version):  # replaced before any decision
        reason = f"{reason or 'by hand'}; replaces v{before}, undecided"
        client.set_model_version_tag(model_name, before, "challenge_outcome", "replaced")
    audit.record(client, model_name, CHALLENGER, before, version, "challenge",
                 by or audit.actor("challenge"), reason or "by hand")


def retire_challenger(model_name: str, version: str, outcome: str, by: str, reason: str,
                      evidence: dict | None = None) -> None:
    """Take the challenger alias from `version` (promoted, rolled back, or no
    difference shown) and tag it with why. RegistryError if the alias has moved to
    another version meanwhile (a deploy made a new challenger): that one stays."""
    client = mlflow.MlflowClient()
    holding = alias_version(client, model_name, CHALLENGER)
    if holding != str(version):
        raise RegistryError(f"{model_name}'s challenger is now "
                            f"{'v' + holding if holding else 'none'}, not v{version}")
    client.delete_registered_model_alias(model_name, CHALLENGER)
    client.set_model_version_tag(model_name, version, "challenge_outcome", outcome)
    audit.record(client, model_name, CHALLENGER, version, None, "decision", by, reason,
                 evidence)
