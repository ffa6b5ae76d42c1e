"""Several server processes on one port, each with a listening socket of its own.

uvicorn's own `--workers` shares one listening socket among its processes, and the
first process to wake accepts every connection waiting: 8 keep-alive connections
opened together landed 8/0 or 7/1 on 2 workers, and one worker did all the work
while the other idled. Here each worker binds its own socket with `SO_REUSEPORT`, so
the kernel spreads new connections over the workers by a hash of their addresses.

`Supervisor.run` starts the workers (spawned: each imports the app afresh), replaces
one that dies or hangs, and on SIGTERM or SIGINT passes the signal on and waits while
every worker finishes the requests it accepted. A worker hangs when its event loop
stops beating: from the moment it starts, it touches `heartbeat-<pid>` every 0.2 s
(`InferenceService.beat`); silent for `TEXTOPS_WORKER_TIMEOUT_S` of the
supervisor's own running time, it is killed and replaced. (Counting only time the
supervisor ran means a whole service stopped and resumed, as the benchmark does with
SIGSTOP, is not mistaken for hung workers.) A worker that fails before it ever served
(a bad bundle setting, a port held by a process without `SO_REUSEPORT`) stops the
whole service with the worker's exit code instead of being restarted forever.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from multiprocessing.connection import wait
from pathlib import Path

log = logging.getLogger("serving")

STARTUP_FAILURE = 3  # uvicorn's exit code for a server that could not start
RESTART_DELAY_S = 1.0  # between a worker's death and its replacement: no busy loop


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def serve(options: dict, supervisor: int) -> None:
    """One worker: its own socket on the shared port, the app from `worker_app`."""
    import uvicorn

    stop_with(supervisor)
    try:
        sock = listening_socket(options["host"], options["port"])
    except OSError as err:
        logging.basicConfig()
        log.error("cannot listen on %s:%s: %s", options["host"], options["port"], err)
        raise SystemExit(STARTUP_FAILURE) from None
    config = uvicorn.Config("serving.api.app:worker_app", factory=True, **options)
    uvicorn.Server(config).run(sockets=[sock])


def stop_with(supervisor: int) -> None:
    """Drain and exit (as on SIGTERM) once the supervisor is gone, however it went: a
    SIGKILL leaves it no time to stop its workers, which would serve on, orphaned."""
    def watch():
        while os.getppid() == supervisor:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


class Supervisor:
    """`workers` processes serving `options` (uvicorn.Config keywords)."""

    def __init__(self, workers: int, options: dict, shared: Path, grace_s: float,
                 hang_s: float = 30.0):
        self.workers, self.options, self.shared = workers, options, shared
        self.grace_s = grace_s  # how long a worker may take to drain at shutdown
        self.heartbeats = Heartbeats(shared, hang_s)
        self.context = multiprocessing.get_context("spawn")
        self.processes: list[multiprocessing.Process] = []
        self.stopping = False

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; the exit code for the service."""
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signal_number, self._stop)
        log.info("starting %d server processes on %s:%s", self.workers,
                 self.options["host"], self.options["port"])
        self.processes = [self._start() for _ in range(self.workers)]
        code = self._watch()
        self._shut_down()
        return code

    def _stop(self, signal_number, frame) -> None:
        self.stopping = True

    def _start(self) -> multiprocessing.Process:
        process = self.context.Process(target=serve, args=(self.options, os.getpid()),
                                       name="textops-worker")
        process.start()
        return process

    def _watch(self) -> int:
        """Replace workers that die or hang, until asked to stop; a non-zero code if one
        could not start at all."""
        last = time.monotonic()
        while not self.stopping:
            wait([p.sentinel for p in self.processes], timeout=0.5)
            now, step = time.monotonic(), time.monotonic() - last
            last = now
            for i, process in enumerate(self.processes):
                if self.stopping:
                    break
                if process.is_alive():
                    if not self.heartbeats.hung(process.pid, step):
                        continue
                    log.error("server process %s has not answered for %.0f s; killing it",
                              process.pid, self.heartbeats.timeout_s)
                    process.kill()
                    process.join()
                self._forget(process)
                if process.exitcode == STARTUP_FAILURE:
                    log.error("server process %s could not start; stopping", process.pid)
                    return STARTUP_FAILURE
                log.warning("server process %s exited (%s); starting another",
                            process.pid, process.exitcode)
                time.sleep(RESTART_DELAY_S)
                self.processes[i] = self._start()
        return 0

    def _shut_down(self) -> None:
        """SIGTERM to every worker (each drains what it accepted), SIGKILL to one still
        running after the grace period."""
        for process in self.processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("server process %s did not finish in %.0f s; killing it",
                          process.pid, self.grace_s)
                process.kill()
                process.join()
            self._forget(process)

    def _forget(self, process: multiprocessing.Process) -> None:
        self.heartbeats.forget(process.pid)
        self._forget_files()

    def _forget_files(self) -> None:
        """Dead workers' live gauges and files leave the shared directory."""
        from serving.processes.workers import WorkerGroup

        WorkerGroup(self.shared, pid=os.getpid()).forget_dead()


class Heartbeats:
    """Which workers stopped beating: a heartbeat file unchanged for `timeout_s` of
    the supervisor's running time (each check adds at most 1 s, so a pause of the
    supervisor itself never counts)."""

    def __init__(self, shared: Path, timeout_s: float):
        self.shared, self.timeout_s = shared, timeout_s
        self.seen: dict[int, tuple[int, float]] = {}  # pid -> (mtime, quiet seconds)

    def hung(self, pid: int, step_s: float) -> bool:
        try:
            beat = (self.shared / f"heartbeat-{pid}").stat().st_mtime_ns
        except FileNotFoundError:  # still starting (loading its bundle): not judged
            return False
        last, quiet = self.seen.get(pid, (beat, 0.0))
        quiet = 0.0 if beat != last else quiet + min(step_s, 1.0)
        self.seen[pid] = (beat, quiet)
        return quiet > self.timeout_s

    def forget(self, pid: int | None) -> None:
        self.seen.pop(pid, None)
