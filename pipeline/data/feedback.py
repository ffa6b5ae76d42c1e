"""Export the service's labelled answers into the snapshot collect reads.

A live database is no DVC dependency: its contents change under DVC's feet. The
labelled rows are therefore written into a JSON-lines file (`data.feedback.snapshot`,
`data/feedback/labelled.jsonl` by default) that collect reads and DVC hashes, so a
retraining is a function of files again.

The snapshot accumulates: rows already in it are kept, and a row the log holds again
(the same request id and position) takes the log's latest label. The log prunes old
predictions (retention by age and size), and the labels that trained earlier models
must not vanish with them.

An encrypted log is decrypted with the keys the service's settings name
(TEXTOPS_PREDICTION_LOG_KEYS or TEXTOPS_PREDICTION_LOG_KEY_FILE, read from the
environment by serving/predlog/crypto.py); without them the export fails, naming them.
The snapshot holds plaintext, as training reads it: DVC tracks it, git does not.

    python -m pipeline.data.feedback export [--log URL] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline import atomic
from pipeline.config import load_params
from pipeline.data.readers import iter_jsonl, read_text

FIELDS = ("request_id", "position", "text", "text_sha256", "label", "predicted",
          "model_version", "created")


def read_snapshot(path: Path) -> list[dict]:
    """The rows of an earlier snapshot; none when there is none yet."""
    if not path.exists():
        return []
    text, _ = read_text(path)
    return [record for _, record in iter_jsonl(text, path)]


def export(log_url: str, snapshot: Path) -> dict:
    """Merge every labelled answer of the log at `log_url` into `snapshot`, written
    atomically in label order. Returns what was written: rows, how many came from the
    log now, and the time of the latest label."""
    from serving.predlog.reader import read_labelled  # the pipeline reads the service's log

    logged = read_labelled(log_url)
    rows = {(r["request_id"], r["position"]): r for r in read_snapshot(snapshot)}
    before = len(rows)
    for row in logged:
        rows[(row["request_id"], row["position"])] = {field: row[field] for field in FIELDS}
    ordered = sorted(rows.values(), key=lambda r: (r["created"], r["request_id"], r["position"]))
    atomic.write_text(snapshot, "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n"
                                        for row in ordered))
    return {"snapshot": str(snapshot), "rows": len(ordered), "from_log": len(logged),
            "new": len(ordered) - before,
            "labels_until": max((r["created"] for r in ordered), default=None)}


def default_log_url(cfg) -> str:
    """The log the service writes: its own setting when set here, else the config's."""
    return os.environ.get("TEXTOPS_PREDICTION_LOG") or cfg.retrain.prediction_log


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.data.feedback")
    commands = parser.add_subparsers(dest="command", required=True)
    export_command = commands.add_parser("export", help="snapshot the labelled answers")
    export_command.add_argument("--log", help="the prediction log's URL (default: "
                                "TEXTOPS_PREDICTION_LOG, else retrain.prediction_log)")
    export_command.add_argument("--out", help="the snapshot (default: data.feedback.snapshot)")
    args = parser.parse_args(argv)
    cfg = load_params()
    out = args.out or cfg.data.feedback.snapshot
    if not out:
        sys.exit("feedback: data.feedback.snapshot is null and no --out given")
    from serving.predlog.store import PredictionLogError

    try:
        written = export(args.log or default_log_url(cfg), Path(out))
    except PredictionLogError as err:
        sys.exit(f"feedback: {err}")
    print(f"feedback: {written['rows']} labelled rows in {out} ({written['new']} new)")


if __name__ == "__main__":
    main()
