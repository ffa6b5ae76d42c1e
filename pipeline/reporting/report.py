"""The run report: one self-contained HTML page that tells a pipeline run's story:
the gate's verdict and its reasons, the test metrics, evaluate's pictures, the
training curves, the data profile with its leakage findings, and the model card.

Built from a workspace (the stages' outputs under `root`) or, with a run id, from
that MLflow training run's artifacts (pipeline/reporting/sources.py). A piece the
run lacks is shown as not available; only the metrics are required.

    python -m pipeline.reporting.report [--out reports/report.html] [--run RUN_ID]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline import atomic
from pipeline.config import PARAMS_FILE, Paths, load_params, tracking_uri
from pipeline.reporting import sources
from pipeline.reporting.page import document, esc, image, key_values, missing, number, share, table
from pipeline.reporting.sources import RunFiles

HEADLINE = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "roc_auc", "pr_auc",
            "ece",
            # next-word prediction's (pipeline/tasks/next_word/scoring.py)
            "perplexity", "perplexity_per_word", "perplexity_vs_baseline", "top5_accuracy",
            "tokens", "rows")


class MissingMetrics(FileNotFoundError):
    """Nothing to report: the run has no test metrics (evaluate has not run)."""


def build_report(root: Path, out: Path, run_id: str | None = None) -> Path:
    """Write the report of the workspace at `root`, or of MLflow run `run_id` (tracked
    where `root`'s configuration says), to `out` atomically; returns `out`."""
    root, out = Path(root), Path(out)
    if run_id is None:
        text = render(sources.workspace_files(root))
    else:
        with sources.mlflow_run_files(run_id, tracking_uri_of(root)) as files:
            text = render(files)
    atomic.write_text(out, text)
    return out


def tracking_uri_of(root: Path) -> str:
    """pipeline.config.tracking_uri for the workspace at `root`: MLFLOW_TRACKING_URI,
    else params.yaml's, with a relative SQLite path (the default sqlite:///mlflow.db)
    taken from `root`, as the stages that run there take it, not from here."""
    params = root / PARAMS_FILE
    if params.exists():
        uri = tracking_uri(load_params(params))
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]
    else:
        raise FileNotFoundError(f"{params}: no configuration to find the MLflow tracking "
                                "server in; set MLFLOW_TRACKING_URI or run `make params`")
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri.removeprefix(prefix)).is_absolute():
        uri = prefix + str((root / uri.removeprefix(prefix)).resolve())
    return uri


def read(path: Path) -> tuple[object, str | None]:
    """(the JSON in `path`, None) or (None, why there is none)."""
    if not path.exists():
        return None, "missing"
    try:
        return atomic.read_json(path), None
    except (OSError, ValueError) as err:
        return None, f"unreadable ({err})"


def render(files: RunFiles) -> str:
    metrics, problem = read(files.metrics)
    if metrics is None:
        raise MissingMetrics(f"{files.origin}: no test metrics to report: "
                             f"{files.name(files.metrics)} is {problem} (run evaluate first)")
    gate, _ = read(files.gate)
    title = f"Pipeline run report: {gate['model_name']}" if isinstance(gate, dict) \
        and gate.get("model_name") else "Pipeline run report"
    return document(title, f"Built from {files.origin}", [
        ("gate", "Gate verdict", gate_section(files)),
        ("metrics", "Test metrics", metrics_section(metrics)),
        ("plots", "Plots", plots_section(files)),
        ("training", "Training curves", training_section(files)),
        ("data", "Data profile and leakage", data_section(files)),
        ("model-card", "Model card", model_card_section(files)),
    ])


def gate_section(files: RunFiles) -> str:
    verdict, problem = read(files.gate)
    if not isinstance(verdict, dict):
        return missing(f"{files.name(files.gate)} is {problem or 'not a verdict'}")
    blessed = bool(verdict.get("blessed"))
    badge = (f'<p><span class="verdict {"blessed" if blessed else "refused"}" id="verdict">'
             f'{"BLESSED" if blessed else "NOT BLESSED"}</span></p>')
    checks = verdict.get("checks") or [{"reason": r} for r in verdict.get("reasons", [])]
    items = "".join(
        f'<li class="{"pass" if c.get("passed", blessed) else "fail"}">'
        f'{"✓" if c.get("passed", blessed) else "✗"} {esc(c.get("reason", ""))}</li>'
        for c in checks)
    return f'{badge}<ul class="checks">{items}</ul>'


def metrics_section(metrics: dict) -> str:
    parts = [table(("metric", "value"), [(k, metrics[k]) for k in HEADLINE if k in metrics])]
    per_class = metrics.get("per_class") or {}
    if per_class:
        parts.append("<h3>Per class</h3>" + table(
            ("class", "precision", "recall", "F1", "support"),
            [(name, v.get("precision"), v.get("recall"), v.get("f1"), v.get("support"))
             for name, v in per_class.items()]))
    held = metrics.get("feedback_test")
    if isinstance(held, dict):
        recall = ", ".join(f"{name} {number(value)}"
                           for name, value in (held.get("recall") or {}).items())
        parts.append("<h3>Held-out production feedback</h3>" + table(
            ("rows", "accuracy", "recall per class"),
            [(held.get("rows"), held.get("accuracy"), recall)]))
    return "\n".join(parts)


def plots_section(files: RunFiles) -> str:
    shown = [image(files.plots / name, caption)
             for name, caption in sources.EVALUATION_IMAGES.items()
             if (files.plots / name).is_file()]
    absent = [files.name(files.plots / name) for name in sources.EVALUATION_IMAGES
              if not (files.plots / name).is_file()]
    body = f'<div class="figures">{"".join(shown)}</div>' if shown else ""
    if absent:
        body += missing(", ".join(absent) + (" is" if len(absent) == 1 else " are") + " missing")
    return body


def training_section(files: RunFiles) -> str:
    parts = []
    if files.train_curves_image.is_file():
        parts.append(image(files.train_curves_image, "Loss, accuracy and F1 per epoch"))
    rows, problem = read(files.train_curves)
    if isinstance(rows, list) and rows:
        names = sorted({k for row in rows for k in row} - {"epoch", "step"})
        parts.append(table(("epoch", "step", *names),
                           [(row.get("epoch"), row.get("step"), *(row.get(n) for n in names))
                            for row in rows]))
    if not parts:
        return missing(f"{files.name(files.train_curves)} is {problem or 'empty'}")
    return "\n".join(parts)


def data_section(files: RunFiles) -> str:
    profile, problem = read(files.profile)
    if not isinstance(profile, dict):
        meta, _ = read(files.bundle_meta)  # the bundle carries the profile it was built on
        profile = meta.get("profile") if isinstance(meta, dict) else None
    if not isinstance(profile, dict):
        return missing(f"{files.name(files.profile)} is {problem or 'not a profile'}")
    data = profile.get("data", {})
    parts = [table(("data", "content hash", "classes", "vocabulary", "max tokens"), [(
        data.get("name"), str(data.get("content_hash", ""))[:16],
        ", ".join(map(str, profile.get("label_names", []))), profile.get("vocab_size"),
        profile.get("max_length"))])]
    splits = profile.get("splits") or {}
    parts.append("<h3>Splits</h3>" + table(
        ("split", "rows", "classes", "tokens: median", "95th percentile", "max", "truncated",
         "unknown tokens"),
        [(name, s.get("rows"), ", ".join(f"{k} {v}" for k, v in s.get("class_counts", {}).items()),
          *(tokens(s.get("tokens", {}).get(p)) for p in ("p50", "p95", "max")),
          share(s.get("truncated_share")), share(s.get("unk_rate")))
         for name, s in splits.items()]))
    parts.append("<h3>Leakage from train</h3>" + leakage_table(profile.get("leakage") or {}))
    for key, title in (("cleaning", "Cleaning"), ("splitting", "Splitting"),
                       ("feedback", "Production feedback")):
        if isinstance(profile.get(key), dict):
            parts.append(f"<h3>{title}</h3>" + key_values(profile[key]))
    return "\n".join(parts)


def tokens(value: object) -> str:
    """A token count or percentile: 7, 7.5; not 7.0000."""
    return f"{value:g}" if isinstance(value, int | float) else number(value)


def leakage_table(leakage: dict) -> str:
    if not leakage:
        return missing("the profile records no leakage check")
    rows = []
    for split, found in leakage.items():
        example = found.get("example")
        shown = (f"{example['row']!r} ({example['kind'].replace('_', ' ')}) "
                 f"{example['train_row']!r}") if example else ""
        rows.append((split, found.get("rows"), found.get("leaked"), share(found.get("share")),
                     found.get("equal"), found.get("contained"), found.get("near_duplicate"),
                     shown))
    return table(("split", "rows", "leaked", "share", "equal", "contained", "near-duplicate",
                  "example: held-out row (kind) training row"), rows)


def model_card_section(files: RunFiles) -> str:
    parts = []
    meta, _ = read(files.bundle_meta)
    if isinstance(meta, dict):
        parts.append(table(("model", "bundle version", "task", "family", "blessed"), [(
            meta.get("model_name"), meta.get("version"), meta.get("task"),
            (meta.get("model") or {}).get("name"), (meta.get("gate") or {}).get("blessed"))]))
    if files.model_card.is_file():
        card = files.model_card.read_text(encoding="utf-8")
        parts.append(f'<pre class="card">{esc(card)}</pre>')
    if not parts:
        return missing(f"{files.name(files.model_card)} is missing (deploy has not built "
                       "a bundle from this model)")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.reporting.report",
        description="Write a pipeline run's report: one self-contained HTML page.")
    parser.add_argument("--root", type=Path, default=Path("."),
                        help="the workspace (default: the current directory)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"the HTML file to write (default: {Paths().report})")
    parser.add_argument("--run", metavar="RUN_ID", default=None,
                        help="report this MLflow training run's artifacts instead")
    args = parser.parse_args(argv)
    out = args.out or Paths(args.root).report
    try:
        written = build_report(args.root, out, args.run)
    except (FileNotFoundError, LookupError) as err:
        sys.exit(f"report: {err}")
    print(f"report: {written}")


if __name__ == "__main__":
    main()
