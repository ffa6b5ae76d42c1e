"""The promotion controller: the challenger against the champion on the labels that
came back from production, decided by the sequential rule (sequential.py), and acted
on without a person (`textops decide`, run by hand, by cron or a CronJob).

In shadow mode the service logs both models' answers under one request id
(serving/engine/shadow.py); each label a user sends through /feedback pairs them. In
canary mode each request was answered by one of them (serving/engine/canary.py), and
each model's labelled answers count on their own. The controller counts them for the
current champion and challenger (by their bundle versions, which the log records),
asks `decide` (`promotion.mode` picks the test), and:
- **promote**: the champion alias moves to the challenger (kind `decision`, with the
  evidence) and the challenger alias is taken away; services following the champion
  switch to it;
- **rollback** or **stop_no_difference**: the challenger alias is taken away and the
  version tagged with the outcome;
- **continue**: nothing moves.
A canary that its operational guards stopped in the service (failures, p99; the log
records it: serving/predlog/canary_stops.py) is rolled back whatever its labels say,
with the guard's reason as the decision's. A stop stands until a person clears it
(`clear_canary_stop`, when the trip was the machine's fault and not the model's);
then the services run its canary again while it is the challenger (`textops
challenge` makes it that again once it was retired).
Every decision, acted on or not, is an MLflow run in the `promotion-decisions`
experiment (counts, e-value, p-value, effect and interval), the challenger version's
`decision` tag and a section of its model card in the registry (card.py); services
with a registry show the latest in /metrics (serving/monitoring/promotion.py); the
moves go to the audit trail (pipeline/tracking/audit.py).
The rule depends on the counts alone, so checking after every label, or once a day,
keeps its error rates.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import mlflow
from mlflow.exceptions import MlflowException

from pipeline.config import Paths
from pipeline.promotion.card import decision_section
from pipeline.promotion.sequential import (
    PROMOTE,
    ROLLBACK,
    STOP,
    Paired,
    Rule,
    Unpaired,
    decide,
)
from pipeline.tracking import audit, registry
from pipeline.tracking.cards import write_card
from pipeline.tracking.challenger import CHALLENGER, retire_challenger
from serving.monitoring.promotion import EXPERIMENT, QUANTITIES
from serving.predlog.canary_stops import is_missing_table
from serving.predlog.schema import CANARY_LABELS, CANARY_STOPPED, PAIRED_LABELS
from serving.predlog.store import open_store

CANARY_STOP = "canary-stop"  # the audit trail's name for a canary stop cleared by hand


def read(log_url: str, statement: str, args: tuple) -> list[tuple]:
    """A query's rows from the prediction log, opened read-only."""
    store = open_store(log_url, create=False)
    try:
        return store.rows(statement, args)
    finally:
        store.close()


def paired_counts(log_url: str, champion_bundle: str, challenger_bundle: str,
                  since: float = 0.0) -> Paired:
    """The labelled requests both bundles answered since `since` (unix seconds): n,
    b (only the challenger right), c (only the champion right)."""
    rows = read(log_url, PAIRED_LABELS, (champion_bundle, challenger_bundle, since))
    return Paired.from_outcomes([label == champion for label, champion, _ in rows],
                                [label == challenger for label, _, challenger in rows])


def canary_counts(log_url: str, champion_bundle: str, challenger_bundle: str,
                  since: float = 0.0) -> Unpaired:
    """Each model's labelled answers since `since` and how many were right (canary
    mode): the champion's from the same weeks as the challenger's, not its whole past."""
    rows = read(log_url, CANARY_LABELS, (champion_bundle, challenger_bundle, since))
    counts = {version: (int(n), int(right or 0)) for version, n, right in rows}
    champion = counts.get(champion_bundle, (0, 0))
    challenger = counts.get(challenger_bundle, (0, 0))
    return Unpaired(champion[0], champion[1], challenger[0], challenger[1])


def canary_stop(log_url: str, challenger_bundle: str) -> str | None:
    """Why the service's guards stopped the challenger's canary, if they did (a stop
    stands until `clear_canary_stop`: serving/predlog/canary_stops.py)."""
    try:
        rows = read(log_url, CANARY_STOPPED, (challenger_bundle,))
    except Exception as err:
        if is_missing_table(err):  # no server of this version has opened the log
            return None
        raise
    return rows[0][0] if rows else None


def clear_canary_stop(name: str, version: str, log_url: str, by: str, reason: str) -> str:
    """Let registered `version` run a canary again (`textops clear-stop`): the clearing
    goes to the audit trail (alias `canary-stop`, kind `cleared`) with the stop's
    reason as evidence, then the stop leaves the log. Returns that reason;
    RegistryError when the log holds no stop of it."""
    client = mlflow.MlflowClient()
    bundle = bundle_version(client, name, version)
    store = open_store(log_url, create=False)  # a log that is not there is an error
    try:
        try:
            rows = store.rows(CANARY_STOPPED, (bundle,))
        except Exception as err:
            if not (is_missing_table(err) and "canary_stops" in str(err)):
                raise
            rows = []  # no server of this version has opened the log: no stop
        if not rows:
            raise registry.RegistryError(f"{name} v{version} (bundle {bundle}) has no "
                                         "canary stop in the prediction log")
        audit.record(client, name, CANARY_STOP, version, None, "cleared", by, reason,
                     {"stop": rows[0][0]})  # first: no stop leaves without a trail
        store.clear_canary_stop(bundle)
    finally:
        store.close()
    return rows[0][0]


def challenge_started(client: mlflow.MlflowClient, name: str, challenger: str) -> float:
    """When `challenger` last got the challenger alias (the audit trail), in unix
    seconds; 0 when the trail does not say. Answers from before then are no evidence
    about this challenge."""
    for move in audit.moves(client, name):
        if move["alias"] == CHALLENGER and move["to_version"] == challenger:
            return dt.datetime.fromisoformat(move["moved_at"]).timestamp()
    return 0.0


def bundle_version(client: mlflow.MlflowClient, name: str, version: str) -> str:
    """The bundle version (what the prediction log records) of a registry version."""
    try:
        found = client.get_model_version(name, version).tags.get("bundle_version")
    except MlflowException:
        raise registry.RegistryError(f"{name} has no version {version}") from None
    if not found:
        raise registry.RegistryError(f"{name} v{version} has no bundle_version tag")
    return found


def record_decision(client: mlflow.MlflowClient, name: str, champion: str, challenger: str,
                    evidence: dict, acted: bool, dry_run: bool) -> None:
    """The decision as an MLflow run (a dry run too, tagged so: /metrics skips those);
    unless a dry run, also the challenger version's `decision` tag and its card."""
    found = client.get_experiment_by_name(EXPERIMENT)
    experiment = found.experiment_id if found else client.create_experiment(EXPERIMENT)
    run = client.create_run(experiment, run_name=f"{name}: v{challenger} against "
                            f"v{champion}: {evidence['outcome']}",
                            tags={"model": name, "champion": champion,
                                  "challenger": challenger, "outcome": evidence["outcome"],
                                  "mode": evidence["mode"], "acted": str(acted).lower(),
                                  "dry_run": str(dry_run).lower(),
                                  "reason": evidence["reason"][:5000]})
    for key in QUANTITIES:
        if isinstance(evidence.get(key), int | float):
            client.log_metric(run.info.run_id, key, float(evidence[key]))
    client.set_terminated(run.info.run_id)
    if dry_run:
        return
    decided_at = dt.datetime.fromtimestamp(run.info.start_time / 1000, dt.UTC)
    client.set_model_version_tag(name, challenger, "decision", json.dumps(
        {**evidence, "champion": champion, "acted": acted,
         "decided_at": decided_at.isoformat()}, sort_keys=True))
    write_card(client, name, challenger,
               decision_section(champion, challenger, evidence, decided_at, acted))


def check(name: str, promotion: dict, log_url: str, paths: Paths, act: bool = True) -> dict:
    """Decide on the challenger now; act on it unless `act` is False (a dry run, which
    changes nothing in the registry). Returns the decision with the two versions, and
    whether it moved anything."""
    client = mlflow.MlflowClient()
    champion = registry.alias_version(client, name)
    challenger = registry.alias_version(client, name, CHALLENGER)
    if challenger is None or champion is None:
        return {"outcome": None, "champion": champion, "challenger": challenger,
                "reason": f"{name} has no {'challenger' if champion else 'champion'}"}
    count = paired_counts if promotion["mode"] == "shadow" else canary_counts
    challenger_bundle = bundle_version(client, name, challenger)
    decision = decide(count(log_url, bundle_version(client, name, champion), challenger_bundle,
                            challenge_started(client, name, challenger)),
                      Rule.from_config(promotion))
    if promotion["mode"] == "canary" and (why := canary_stop(log_url, challenger_bundle)):
        decision = dataclasses.replace(decision, outcome=ROLLBACK, reason=(
            f"the service's guards stopped the canary: the challenger {why}"))
    evidence = decision.as_dict()
    acted = act and decision.outcome in (PROMOTE, ROLLBACK, STOP)
    if acted:  # first, so that what is recorded says what happened
        by = audit.actor("decide")
        if decision.outcome == PROMOTE:
            registry.promote_version(name, challenger, paths, kind="decision", by=by,
                                     reason=decision.reason, evidence=evidence)
        retire_challenger(name, challenger, decision.outcome, by, decision.reason,
                          evidence)
    record_decision(client, name, champion, challenger, evidence, acted, dry_run=not act)
    return {"champion": champion, "challenger": challenger, **evidence, "acted": acted}
