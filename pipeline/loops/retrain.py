"""`make retrain`: read the running service's state, decide whether to retrain, and if
so snapshot the feedback and run the pipeline; the gate decides what goes live.

Whether to retrain is decided in pipeline.loops.triggers: any one trigger is enough
(drift, live accuracy, new labels, `--force`), each with its calibrated threshold.

The record (`retrain.record`, reports/retrain.json) holds the signals read, the
thresholds, every trigger with its reason, the decision, and for a retraining the
snapshot, the pipeline's outcome, the gate's verdict and the deploy's promotion. It
is written atomically and printed. `--dry-run` decides and records, nothing more.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from omegaconf import DictConfig

from pipeline import atomic, logs
from pipeline.config import Paths, load_params
from pipeline.data import feedback
from pipeline.loops.triggers import Signals, decide, iso, read_log, read_service

# ---------------------------------------------------------------- retraining


def run_pipeline(command: list[str], root: Path, log_path: Path) -> tuple[dict, str]:
    """Run the pipeline in `root`; its whole output goes to `log_path`, its tail (when
    it failed) to the record."""
    started = time.time()
    result = subprocess.run(command, cwd=root, capture_output=True, text=True)
    output = result.stdout + result.stderr
    atomic.write_text(log_path, output)
    return {"command": command, "returncode": result.returncode,
            "seconds": round(time.time() - started, 1), "log": str(log_path),
            "tail": output[-2000:] if result.returncode else ""}, output


def track_snapshot(root: Path, snapshot: str) -> str | None:
    """Put the snapshot under DVC (`dvc add`): git keeps its hash, the DVC cache and
    remote its rows, so a colleague's `dvc pull` gets the feedback a model trained on
    and their `dvc repro` reruns nothing. The error, if DVC refused; nothing to do
    outside a DVC repository (a custom `retrain.command`)."""
    if not (root / ".dvc").is_dir():
        return None
    result = subprocess.run([sys.executable, "-m", "dvc", "add", "--quiet", snapshot],
                            cwd=root, capture_output=True, text=True)
    if result.returncode:
        return f"dvc add {snapshot} failed: {(result.stdout + result.stderr).strip()[-500:]}"
    return None


def outcome(paths: Paths, output: str) -> dict:
    """What the gate and the deploy stage made of the new model. When DVC found
    nothing out of date (the same snapshot again), no model was judged: said so,
    rather than repeating an older verdict."""
    stages = re.findall(r"Running stage '([\w-]+)'", output)
    if "deploy" not in stages:
        return {"stages_run": stages, "promoted": False,
                "note": "deploy did not run: the pipeline was up to date"}
    gate = atomic.read_json(paths.gate)
    deployed = atomic.read_json(paths.deploy_report)
    registry = atomic.read_json(paths.run_facts("deploy"))
    return {"stages_run": stages, "blessed": gate["blessed"], "gate_reasons": gate["reasons"],
            "promoted": deployed["promoted"], "bundle_version": deployed["bundle_version"],
            "registry_version": registry["registry_version"]}


def retrain(cfg: DictConfig, log_url: str, paths: Paths) -> dict:
    """Snapshot the feedback, run the pipeline, and read the verdict."""
    snapshot = cfg.data.feedback.snapshot
    if not snapshot:
        return {"error": "data.feedback.snapshot is null: the pipeline would not see the "
                         "feedback; set it (make params OVERRIDES=...) to retrain on it"}
    from serving.predlog.store import PredictionLogError

    try:
        exported = feedback.export(log_url, paths.root / snapshot)
    except (PredictionLogError, OSError) as err:
        return {"error": f"the feedback could not be exported: {err}"}
    tracked = track_snapshot(paths.root, snapshot)
    if tracked:
        return {"snapshot": exported, "error": tracked}
    ran, output = run_pipeline(list(cfg.retrain.command), paths.root,
                               paths.run_facts("retrain").with_suffix(".log"))
    done = {"snapshot": exported, "pipeline": ran}
    if ran["returncode"] == 0:
        done.update(outcome(paths, output))
    return done


# ---------------------------------------------------------------- the stage


def last_retraining(record_path: Path) -> dict | None:
    """The last retraining that ran the pipeline to its end, as the previous record
    carries it forward."""
    if not record_path.exists():
        return None
    return atomic.read_json(record_path).get("last_retraining")


def without_password(url: str) -> str:
    """The URL as the record may show it: printed, and kept in reports/retrain.json."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def run(cfg: DictConfig, service_url: str, log_url: str, force: bool = False,
        dry_run: bool = False, paths: Paths | None = None) -> dict:
    """Read, decide, retrain if a trigger fired (unless `dry_run`), record. `paths.root`
    is the repository the pipeline runs in (the working directory by default)."""
    paths = paths or Paths()
    record_path = paths.root / cfg.retrain.record
    last = last_retraining(record_path)
    since = last["labels_until"] if last else None
    signals = Signals()
    read_service(signals, service_url)
    read_log(signals, log_url, since)
    triggers, limits = decide(signals, cfg.retrain, since, force)
    fired = [t["reason"] for t in triggers if t["fired"]]
    now = time.time()
    record = {
        "time": iso(now), "service": service_url, "prediction_log": without_password(log_url),
        "decision": "retrain" if fired else "no retraining",
        "reasons": fired or ["no trigger fired"],
        "triggers": triggers, "thresholds": limits,
        "signals": {k: v for k, v in asdict(signals).items() if k != "profile"},
        "dry_run": dry_run, "last_retraining": last,
    }
    if fired and dry_run:
        record["decision"] = "retrain (dry run: nothing ran)"
    elif fired:
        record["result"] = retrain(cfg, log_url, paths)
        if succeeded(record):  # the snapshot's labels trained it: none of them is new
            record["last_retraining"] = {
                "time": iso(now), "labels_until": record["result"]["snapshot"]["labels_until"]}
    atomic.write_json(record_path, record)
    return record


def summary(result: dict) -> str:
    """One line on what the retraining came to."""
    if "error" in result:
        return result["error"]
    if result["pipeline"]["returncode"]:
        return f"the pipeline failed (exit {result['pipeline']['returncode']}; " \
               f"log: {result['pipeline']['log']})"
    if "note" in result:
        return result["note"]
    verdict = "promoted to champion" if result["promoted"] else "registered, NOT promoted"
    return f"version {result['registry_version']} {verdict}: " + "; ".join(result["gate_reasons"])


def succeeded(record: dict) -> bool:
    """No retraining was asked for, or the one asked for ran the pipeline to its end."""
    result = record.get("result")
    return result is None or result.get("pipeline", {}).get("returncode") == 0


def main(argv: list[str] | None = None) -> None:
    logs.quiet()
    cfg = load_params()
    parser = argparse.ArgumentParser(prog="python -m pipeline.loops.retrain")
    parser.add_argument("--service-url", default=cfg.retrain.service_url)
    parser.add_argument("--log", help="the prediction log's URL (default: "
                        "TEXTOPS_PREDICTION_LOG, else retrain.prediction_log)")
    parser.add_argument("--force", action="store_true", help="retrain whatever the triggers")
    parser.add_argument("--dry-run", action="store_true", help="decide and record only")
    args = parser.parse_args(argv)
    record = run(cfg, args.service_url.rstrip("/"), args.log or feedback.default_log_url(cfg),
                 args.force, args.dry_run)
    print(json.dumps(record, indent=2))
    print(f"retrain: {record['decision']}, because: " + "; ".join(record["reasons"]))
    if "result" in record:
        print(f"retrain: {summary(record['result'])}")
    if not succeeded(record):
        sys.exit(1)


if __name__ == "__main__":
    main()
