"""Starting, checking and stopping the service as a process.

Used by the serve stage (a throw-away service on a free loopback port), by
`make deploy` / `make undeploy` (a long-running service: a Docker or Podman container
when one of them works, else a local process, its pid and log in a run directory),
and by the tests.

    python -m ops.control up   [--bundle models/current] [--port 8000] [--run-dir run]
                                   [--runtime auto|docker|podman|process]
    python -m ops.control down [--run-dir run]
    python -m ops.control status [--run-dir run]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ops import container
from serving.processes.workers import alive


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_json(method: str, url: str, body=None, timeout: float = 10.0,
              headers: dict | None = None) -> tuple[int, dict]:
    """One HTTP request with the standard library; returns (status, JSON body).
    A body that is not JSON comes back as {"error" or "text": the text}."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, _json_or_text(response.read(), "text")
    except urllib.error.HTTPError as err:
        return err.code, _json_or_text(err.read(), "error")


def _json_or_text(payload: bytes, key: str):
    try:
        return json.loads(payload or b"null")
    except json.JSONDecodeError:
        return {key: payload.decode(errors="replace")}


def wait_until(url: str, timeout: float, process: subprocess.Popen | None = None,
               accept: Callable[[int, object], bool] = lambda status, body: status == 200,
               interval: float = 0.2) -> object:
    """Poll GET `url` until `accept(status, body)`; return that body.

    The one polling loop for everything that waits for a server (this service, an
    MLflow server, ...): RuntimeError after `timeout` s, naming the last answer, or at
    once when `process` (the server, if we started it) exits first.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with code {process.returncode}")
        try:
            status, body = http_json("GET", url, timeout=2)
            if accept(status, body):
                return body
            last = f"{status} {body}"
        except OSError as err:
            last = str(err)
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{url}: not ready after {timeout:.0f} s ({last})")
        time.sleep(interval)


@dataclass
class Service:
    """A service process started by `start`; `url` is its base address."""

    process: subprocess.Popen
    url: str
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def start(bundle: str | Path, port: int, log_path: Path, host: str = "127.0.0.1",
          env: dict | None = None, detach: bool = False) -> Service:
    """Start `python -m serving` on host:port; `detach` puts it in its own session so
    it outlives the caller (make deploy)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "TEXTOPS_BUNDLE": str(bundle), "TEXTOPS_HOST": host,
                   "TEXTOPS_PORT": str(port), "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "serving"], env=environment, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=detach,
        )
    return Service(process=process, url=f"http://{host}:{port}", log_path=log_path)


def wait_ready(url: str, timeout: float, process: subprocess.Popen | None = None) -> dict:
    """Poll /health/ready until 200; raise RuntimeError on timeout or early exit."""
    return wait_until(f"{url}/health/ready", timeout, process)


# The service's supervisor gives its workers 3 x the request timeout (30 s by default)
# + 10 s to finish what they accepted (serving/api/app.py): wait that long before SIGKILL.
STOP_TIMEOUT_S = 45


def stop(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM (the service drains in-flight requests), then SIGKILL after `timeout`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


# ---------------------------------------------------------------- make deploy / undeploy


def pid_alive(pid: int) -> bool:
    # A child of this process that has exited is a zombie, which kill(pid, 0) still
    # finds, until it is reaped: reap it (only our own children can be).
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    return alive(pid)


def running_pid(run_dir: Path) -> int | None:
    pid_file = run_dir / "service.pid"
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text().split()[0])
    return pid if pid_alive(pid) else None


def running_container(run_dir: Path) -> tuple[container.Runtime, str] | None:
    """(runtime, container name) of the container `up` started from this run
    directory, if it did."""
    record = run_dir / "container.json"
    if not record.exists():
        return None
    started = json.loads(record.read_text())
    return container.Runtime(started["runtime"]), started["name"]


def down(run_dir: Path) -> str:
    """Stop what `up` started; fine when nothing runs."""
    started = running_container(run_dir)
    if started is not None:
        runtime, name = started
        container.stop(runtime, name, timeout=STOP_TIMEOUT_S)
        (run_dir / "container.json").unlink()
        return f"stopped container {name} ({runtime.name})"
    pid = running_pid(run_dir)
    (run_dir / "service.pid").unlink(missing_ok=True)
    if pid is None:
        return "nothing was running"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    return f"stopped service (pid {pid})"


def bundle_version(bundle: Path) -> str:
    return json.loads((Path(bundle) / "bundle.json").read_text())["version"]


def switched_in_place(url: str, version: str, timeout: float) -> bool:
    """Whether a service already answering at `url` serves `version` within `timeout`.

    A running service follows its bundle link and swaps in a new champion by itself,
    without a restart; this waits for that to happen.
    """
    try:
        http_json("GET", f"{url}/health/ready", timeout=2)
    except OSError:
        return False  # nothing answers: nothing will switch
    try:
        wait_until(f"{url}/health/ready", timeout, interval=0.5,
                   accept=lambda status, body: status == 200
                   and body.get("model_version") == version)
    except RuntimeError:
        return False
    return True


def up(bundle: Path, port: int, run_dir: Path, host: str, timeout: float,
       runtime_choice: str = "auto") -> tuple[str, str]:
    """Serve `bundle` on host:port and wait until it is ready; (URL, where its log is).

    If this run directory's service is already up, it switches to the new bundle
    without a restart; only if it does not is it replaced. `runtime_choice` "auto"
    takes a container when Docker or Podman works and the local process when none
    does or the container fails, saying why; "docker" or "podman" insist on one;
    "process" never tries a container.
    """
    if not (Path(bundle) / "bundle.json").exists():
        raise RuntimeError(f"{bundle}: no bundle; run `dvc repro` first (a blessed model "
                           "is needed for models/current)")
    url = f"http://{host}:{port}"
    version = bundle_version(bundle)
    running = running_pid(run_dir) or running_container(run_dir)
    if running and switched_in_place(url, version, timeout=15):
        print(f"deploy: the running service switched to {version} in place")
        return url, log_hint(run_dir)
    down(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    runtime = choose_runtime(runtime_choice)
    if runtime is not None:
        try:
            up_container(runtime, bundle, port, run_dir, host, timeout)
            return url, log_hint(run_dir)
        except container.ContainerError as err:
            down(run_dir)
            if runtime_choice != "auto":
                raise RuntimeError(f"{runtime.name}: {err}") from None
            print(f"deploy: the {runtime.name} container failed, so a local process serves "
                  f"instead: {err}")
    up_process(bundle, port, run_dir, host, timeout)
    return url, log_hint(run_dir)


def choose_runtime(choice: str) -> container.Runtime | None:
    """The container runtime to deploy with, or None for a local process (saying why)."""
    if choice == "process":
        print("deploy: serving as a local process (asked for: DEPLOY_RUNTIME=process)")
        return None
    try:
        return container.find_runtime(choice)
    except container.ContainerError as err:
        if choice != "auto":
            raise RuntimeError(str(err)) from None
        print(f"deploy: serving as a local process: {err}")
        return None


def container_name(port: int) -> str:
    """One name per port: two deployments (say, the test suite's beside yours) on
    different ports do not take each other's container."""
    return f"textops-serving-{port}"


def up_container(runtime: container.Runtime, bundle: Path, port: int, run_dir: Path,
                 host: str, timeout: float) -> None:
    """Build the image and run it with the bundle's directory mounted read-only and
    the run directory writable."""
    name = container_name(port)
    host_dir, mounted_at, _ = container.bundle_mount(bundle)
    print(f"deploy: serving in a {runtime.name} container, {name} "
          f"({host_dir} mounted read-only at {mounted_at})")
    container.check_mountable(bundle)
    build_log = run_dir / "image-build.log"
    print(f"deploy: building {container.IMAGE} (log: {build_log})")
    container.build(runtime, build_log, container.IMAGE)
    # Recorded before it starts, so `down` removes a container whose start failed
    # halfway (created, then the port refused), and one left by a crash goes first.
    (run_dir / "container.json").write_text(json.dumps({"runtime": runtime.name,
                                                        "name": name}) + "\n")
    container.stop(runtime, name)
    # run_dir becomes the container's run/: its prediction log is the host's
    # run/predictions.db, as with a local process
    container.start(runtime, container.IMAGE, name, port, host, bundle, state_dir=run_dir)
    try:
        wait_ready(f"http://{host}:{port}", timeout)
    except RuntimeError as err:
        raise container.ContainerError(f"{err}\n{container.logs(runtime, name)}") from None


def up_process(bundle: Path, port: int, run_dir: Path, host: str, timeout: float) -> None:
    service = start(bundle, port, run_dir / "service.log", host=host, detach=True)
    (run_dir / "service.pid").write_text(f"{service.process.pid}\n")
    try:
        wait_ready(service.url, timeout, service.process)
    except RuntimeError as err:
        down(run_dir)
        raise RuntimeError(f"{err}\n{service.log_tail()}") from None


def log_hint(run_dir: Path) -> str:
    started = running_container(run_dir)
    if started is not None:
        runtime, name = started
        return f"{runtime.name} logs {name}"
    return str(run_dir / "service.log")


def status(run_dir: Path) -> str:
    started = running_container(run_dir)
    if started is not None:
        return f"running in container {started[1]} ({started[0].name})"
    pid = running_pid(run_dir)
    return f"running (pid {pid})" if pid else "not running"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--bundle", type=Path, default=Path("models/current"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--run-dir", type=Path, default=Path("run"))
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--runtime", default="auto",
                        choices=["auto", *container.RUNTIMES, "process"],
                        help="auto: a Docker or Podman container if one works, else a process")
    args = parser.parse_args()
    if args.action == "down":
        print(down(args.run_dir))
    elif args.action == "status":
        print(status(args.run_dir))
    else:
        try:
            url, log = up(args.bundle, args.port, args.run_dir, args.host, args.timeout,
                          args.runtime)
        except RuntimeError as err:
            sys.exit(f"deploy: {err}")
        _, meta = http_json("GET", f"{url}/metadata")
        print(f"\nThe model {meta.get('model_name')} {meta.get('version')} answers at {url}")
        print(f"  docs:  {url}/docs")
        print(f"  try:   curl -s -X POST {url}/predict -H 'Content-Type: application/json' "
              "-d '{\"texts\": [\"a gripping, beautifully acted film\"]}'")
        print(f"  stop:  make undeploy   (log: {log})")


if __name__ == "__main__":
    main()
