"""preprocess: `data/raw/` into `data/processed/`: rows cleaned and split by group
under the leakage rule, the preprocessing the bundle will carry fitted on train (for
text, `tokenizer.json`; for images, `image_spec.json`), every split encoded, and
`profile.json` (sizes, class balance, leakage, the drift reference), validated against
`conf/`'s rules. Nothing is written unless validation passes.

Each task's: pipeline/tasks/<task>/preprocess.py.
"""

from __future__ import annotations

import sys

from pipeline import logs, tasks
from pipeline.config import Paths, load_params
from pipeline.data.profile import ValidationError


def main() -> None:
    logs.quiet()
    cfg = load_params()
    task = tasks.from_config(cfg)
    try:
        profile = task.preprocess(cfg.preprocess, cfg.seed, Paths())
    except ValidationError as err:
        sys.exit(f"preprocess: validation failed: {err}")
    rows = ", ".join(f"{n} {s['rows']}" for n, s in profile["splits"].items())
    leaks = ", ".join(f"{n} {v['share']:.2%}" for n, v in profile["leakage"].items())
    print(f"preprocess: {rows} rows; {task.profile_summary(profile)}; "
          f"rows leaking from train: {leaks}")


if __name__ == "__main__":
    main()
