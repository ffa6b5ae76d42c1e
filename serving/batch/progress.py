"""How far a batch run is: a tqdm bar on a terminal, log lines with rate and ETA
elsewhere (a CI log or a file would fill with a bar's redraws).

The total is the file's row count when it says so (parquet); otherwise it is estimated
from the share of the file's bytes read so far, which also gives the ETA.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from collections.abc import Callable

log = logging.getLogger("serving.batch")

LOG_EVERY_S = 10.0  # between log lines, when there is no bar


def bar_wanted(progress: bool | None) -> bool:
    """progress=None: a bar when stderr is a terminal."""
    if progress is None:
        return sys.stderr.isatty()
    return progress


class Progress:
    def __init__(self, name: str, total_rows: int | None,
                 fraction_read: Callable[[], float | None], bar: bool):
        self.name, self.total_rows, self.fraction_read = name, total_rows, fraction_read
        self.rows = 0
        self.started = self.last_log = time.perf_counter()
        self.bar = None
        if bar:
            try:
                from tqdm import tqdm
            except ImportError:  # not in the serving image: log lines instead
                log.info("no progress bar: tqdm is not installed")
            else:
                self.bar = tqdm(total=total_rows, unit=" rows", desc=name, file=sys.stderr,
                                dynamic_ncols=True, smoothing=0.1)

    def estimated_total(self) -> int | None:
        if self.total_rows is not None:
            return self.total_rows
        fraction = self.fraction_read()
        return round(self.rows / fraction) if fraction and self.rows else None

    def advance(self, rows: int) -> None:
        self.rows += rows
        if self.bar is not None:
            total = self.estimated_total()
            if total is not None and self.total_rows is None:
                self.bar.total = max(total, self.rows)
            self.bar.update(rows)
            return
        now = time.perf_counter()
        if now - self.last_log >= LOG_EVERY_S:
            self.last_log = now
            log.info("%s", self.line(now - self.started))

    def line(self, elapsed: float) -> str:
        rate = self.rows / elapsed if elapsed > 0 else 0.0
        total = self.estimated_total()
        done = f"{self.rows:,} rows"
        if total:
            share = min(self.rows / total, 1.0)
            left = (total - self.rows) / rate if rate else 0.0
            done += (f" of ~{total:,} ({share:.0%}), {rate:,.0f} rows/s, "
                     f"ETA {datetime.timedelta(seconds=round(max(left, 0)))}")
        else:
            done += f", {rate:,.0f} rows/s"
        return f"{self.name}: {done}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.total = self.rows
            self.bar.refresh()
            self.bar.close()
