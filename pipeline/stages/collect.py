"""collect: the configured source (conf/data/) into `data/raw/`, raw examples and
their labels as the task reads them, and `manifest.json` (source, label names, rows per
split, content hash). Bad input stops the stage naming the file and row; nothing is
written then.

Each task's reader: pipeline/tasks/<task>/collect.py.
"""

from __future__ import annotations

import sys

from pipeline import logs, tasks
from pipeline.config import Paths, load_params
from pipeline.data.readers import CollectError


def main() -> None:
    logs.quiet()
    cfg = load_params()
    try:
        manifest = tasks.from_config(cfg).collect(cfg.data, cfg.seed, Paths())
    except CollectError as err:
        sys.exit(f"collect: {err}")
    rows = ", ".join(f"{s} {v['rows']}" for s, v in manifest["splits"].items())
    classes = manifest.get("label_names")  # none for a corpus (next-word prediction)
    print(f"collect: {manifest['name']}: {rows} rows"
          + (f", classes {classes}" if classes else ""))


if __name__ == "__main__":
    main()
