"""Several server processes on one port, so that every core answers requests.

One Python process answers HTTP one request at a time: on 2 cores it left about half
the machine idle, because parsing, routing and building answers hold the GIL. With
`TEXTOPS_WORKERS` above 1, serving/processes/supervisor.py starts that many worker processes on
one port (the kernel spreads connections over their sockets) and replaces a worker
that dies. What the workers must agree on goes through one shared directory,
`PROMETHEUS_MULTIPROC_DIR`, which serving/api/app.py creates empty and removes at exit:

- **metrics**: prometheus-client's multiprocess mode. Counters and histograms are
  summed over all workers, dead ones included; gauges of live workers only (`live*`
  modes), so `/metrics` from any worker describes the whole service.
- **drift**: each worker publishes a summary of its window (bucket counts, not texts)
  as `drift-<pid>.json` every `SYNC_INTERVAL_S` while it changes; a scrape sums the
  live workers' summaries of the same model version.
- **labels**: a worker that stored labels marks `feedback.json`; the others then read
  the live figures from the shared prediction log at once, not at their next interval.
- **reloads**: `POST /admin/reload` reloads the worker that received it, then bumps a
  generation in `reload.json`; every other worker sees it within
  `SYNC_INTERVAL_S`, reloads the same bundle and records the outcome in
  `worker-<pid>.json`. The admin answer waits for all live workers. A worker started
  later (a replacement) starts from the latest reload's bundle, not the original one.

The prediction log needs no coordination: workers write to the same database (SQLite
in WAL mode or PostgreSQL), and live accuracy is read from it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("serving")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# How soon a worker follows a reload another worker received, and how stale its drift
# window may be when another worker answers a scrape.
SYNC_INTERVAL_S = 0.2


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def write_json(path: Path, data: dict) -> None:
    """Replace `path` at once: a reader sees the old content or the new, never half."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data))
    os.replace(temporary, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class WorkerGroup:
    """The shared directory, as one worker sees it."""

    def __init__(self, directory: str | Path, pid: int | None = None):
        self.directory = Path(directory)
        self.pid = pid or os.getpid()
        self.reload_file = self.directory / "reload.json"
        self.seen_generation = self.generation()[0]

    @classmethod
    def from_env(cls) -> WorkerGroup | None:
        """The group this process belongs to, or None when it serves alone."""
        directory = os.environ.get(MULTIPROC_ENV)
        return cls(directory) if directory else None

    # ------------------------------------------------------------ reloads

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.directory / "reload.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def generation(self) -> tuple[int, str | None]:
        """The latest reload's generation and bundle spec (0, None: none yet)."""
        state = read_json(self.reload_file) or {}
        return int(state.get("generation", 0)), state.get("bundle")

    def announce_reload(self, spec: str) -> int:
        """Ask every worker to serve `spec`; returns the new generation."""
        with self._locked():
            generation = self.generation()[0] + 1
            write_json(self.reload_file, {"generation": generation, "bundle": spec,
                                          "by": self.pid, "at": time.time()})
        self.seen_generation = generation
        return generation

    def pending_reload(self) -> tuple[int, str] | None:
        """(generation, spec) of a reload this worker has not followed yet."""
        generation, spec = self.generation()
        if generation > self.seen_generation and spec:
            return generation, spec
        return None

    def report(self, version: str | None, identity: str | None, error: str | None = None,
               generation: int | None = None) -> None:
        """Record what this worker serves, for the admin answer and for tests."""
        if generation is not None:
            self.seen_generation = max(self.seen_generation, generation)
        write_json(self._file("worker"), {"pid": self.pid, "model_version": version,
                                          "identity": identity, "error": error,
                                          "generation": self.seen_generation})

    def workers(self) -> dict[int, dict]:
        """The live workers' latest reports, by pid."""
        return {pid: state for pid, state in self._live("worker")}

    def starting(self, expected: int) -> tuple[int, list[str]]:
        """While the service starts: how many of the `expected` workers serve no bundle
        yet, and why those that failed to load one failed ("pid N: why"). (0, []) once
        all have served, and from then on: a replacement worker that loads later leaves
        the others serving, so the service stays ready."""
        started = self.directory / "started"
        if started.exists():
            return 0, []
        reports = self.workers().values()
        serving = sum(1 for state in reports if state["model_version"])
        if serving < expected:
            return expected - serving, [f"pid {state['pid']}: {state['error']}"
                                        for state in reports
                                        if state["error"] and not state["model_version"]]
        started.touch()
        return 0, []

    def wait_for(self, generation: int, timeout: float) -> dict[int, dict]:
        """Wait until every live worker has followed `generation` (or `timeout`);
        returns each one's report."""
        deadline = time.monotonic() + timeout
        while True:
            workers = self.workers()
            if all(w["generation"] >= generation for w in workers.values()):
                return workers
            if time.monotonic() > deadline:
                return workers
            time.sleep(0.05)

    # ------------------------------------------------------------ labels

    def note_feedback(self) -> None:
        """Tell the other workers that labels were stored, so that they read the live
        figures again (each reads them from the shared database every 10 s anyway)."""
        write_json(self.directory / "feedback.json", {"at": time.time_ns(), "by": self.pid})

    def feedback_since(self, seen: int) -> int:
        """The latest feedback mark; greater than `seen` when labels came since."""
        state = read_json(self.directory / "feedback.json") or {}
        return int(state.get("at", 0)) if state.get("by") != self.pid else seen

    # ------------------------------------------------------------ drift windows

    def publish_drift(self, summary: dict) -> None:
        write_json(self._file("drift"), summary)

    def drift_summaries(self) -> list[dict]:
        """The other live workers' latest drift summaries."""
        return [state for pid, state in self._live("drift") if pid != self.pid]

    # ------------------------------------------------------------ housekeeping

    def beat(self) -> None:
        """Tell the supervisor this worker's event loop runs (serving/processes/supervisor.py)."""
        (self.directory / f"heartbeat-{self.pid}").touch()

    def forget_dead(self) -> None:
        """Drop the files of workers that died without cleaning up (killed, crashed):
        their live gauges, drift windows and reports."""
        from prometheus_client import multiprocess

        for path in self.directory.glob("*_*.db"):
            pid = path.stem.rsplit("_", 1)[-1]
            if path.name.startswith("gauge_live") and pid.isdigit() and not alive(int(pid)):
                multiprocess.mark_process_dead(int(pid), str(self.directory))
        for pattern in ("worker-*.json", "drift-*.json", "heartbeat-*"):
            for path in self.directory.glob(pattern):
                pid = path.name.split("-", 1)[1].removesuffix(".json")
                if pid.isdigit() and not alive(int(pid)):
                    path.unlink(missing_ok=True)

    def leave(self) -> None:
        """A clean exit: this worker's gauges and files go, its counters stay."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(self.pid, str(self.directory))
        for kind in ("worker", "drift"):
            self._file(kind).unlink(missing_ok=True)
        (self.directory / f"heartbeat-{self.pid}").unlink(missing_ok=True)

    def _file(self, kind: str) -> Path:
        return self.directory / f"{kind}-{self.pid}.json"

    def _live(self, kind: str) -> Iterator[tuple[int, dict]]:
        for path in sorted(self.directory.glob(f"{kind}-*.json")):
            pid = path.stem.split("-", 1)[1]
            if not pid.isdigit() or not alive(int(pid)):
                continue
            state = read_json(path)
            if state is not None:
                yield int(pid), state


def resident_bytes() -> int | None:
    """This process's resident memory (Linux), for the per-worker memory gauge."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")
