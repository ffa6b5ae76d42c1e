"""`textops deploy` / `textops undeploy` (and their make targets): bring the service
up, take it down, say how it runs.

`up` serves a bundle as a long-running service: a Docker or Podman container when one
of them works (built by ops/image.py, run by ops/container.py), else a local process
(ops/process.py); its pid or container name and its log are kept in a run directory,
which `down` and `status` read. With `--public-key`, the bundle's signature is verified
first (serving/bundle/signature.py: an altered bundle is not served, and the message
names the file that changed), and the service gets the key to verify every bundle it
loads later. A certificate and key in the environment (`TEXTOPS_TLS_CERT_FILE`,
`TEXTOPS_TLS_KEY_FILE`) make it serve HTTPS, and the prediction log's keys
(`TEXTOPS_PREDICTION_LOG_KEYS` or `_KEY_FILE`) encrypt its log, in a process or a
container alike (ops/container.py: FILE_SETTINGS, PASSED_BY_NAME).

    python -m ops.control up   [--bundle models/current] [--port 8000] [--run-dir run]
                                   [--runtime auto|docker|podman|process]
                                   [--public-key keys/bundle-signing.pub]
    python -m ops.control down [--run-dir run]
    python -m ops.control status [--run-dir run]

The serve stage, the tests and the benchmarks start throw-away services with
`control.start`, `control.wait_ready`, `control.stop` and the HTTP helpers
`control.free_port`, `control.http_json`, `control.wait_until`: those live in
ops/process.py and are imported here under the same names.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from ops import container, image, runtimes
from ops.process import (  # noqa: F401  (Service, free_port, stop: for control.<name> callers)
    STOP_TIMEOUT_S,
    Service,
    base_url,
    free_port,
    http_json,
    start,
    stop,
    wait_ready,
    wait_until,
)
from serving.processes.workers import alive


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


def running_container(run_dir: Path) -> tuple[runtimes.Runtime, str] | None:
    """(runtime, container name) of the container `up` started from this run
    directory, if it did."""
    record = run_dir / "container.json"
    if not record.exists():
        return None
    started = json.loads(record.read_text())
    return runtimes.Runtime(started["runtime"]), started["name"]


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
       runtime_choice: str = "auto", public_key: Path | None = None) -> tuple[str, str]:
    """Serve `bundle` on host:port and wait until it is ready; (URL, where its log is).

    If this run directory's service is already up, it switches to the new bundle
    without a restart; only if it does not is it replaced. `runtime_choice` "auto"
    takes a container when Docker or Podman works and the local process when none
    does or the container fails, saying why; "docker" or "podman" insist on one;
    "process" never tries a container. With `public_key`, a bundle it does not verify
    is refused before anything starts.
    """
    if not (Path(bundle) / "bundle.json").exists():
        raise RuntimeError(f"{bundle}: no bundle; run `dvc repro` first (a blessed model "
                           "is needed for models/current)")
    if public_key is not None:
        check_signature(bundle, public_key)
    files = served_files(public_key)
    url = base_url(host, port, os.environ)
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
            up_container(runtime, bundle, port, run_dir, host, timeout, files)
            return url, log_hint(run_dir)
        except runtimes.ContainerError as err:
            down(run_dir)
            if runtime_choice != "auto":
                raise RuntimeError(f"{runtime.name}: {err}") from None
            print(f"deploy: the {runtime.name} container failed, so a local process serves "
                  f"instead: {err}")
    up_process(bundle, port, run_dir, host, timeout, files)
    return url, log_hint(run_dir)


def check_signature(bundle: Path, public_key: Path) -> None:
    """RuntimeError unless `public_key` verifies the bundle's signature."""
    from serving.bundle.signature import SignatureError, verify

    try:
        verify(Path(bundle).resolve(), public_key)
    except SignatureError as err:
        raise RuntimeError(f"refusing to serve {bundle}: {err}") from None


def served_files(public_key: Path | None) -> dict[str, Path]:
    """The files the service reads by path, by their variables: the bundles' public key,
    and from the environment a certificate, its key and the prediction log's keys."""
    files = {name: Path(os.environ[name]) for name in container.FILE_SETTINGS
             if os.environ.get(name, "").strip()}
    if public_key is not None:
        files["TEXTOPS_BUNDLE_PUBLIC_KEY"] = Path(public_key)
    return files


def choose_runtime(choice: str) -> runtimes.Runtime | None:
    """The container runtime to deploy with, or None for a local process (saying why)."""
    if choice == "process":
        print("deploy: serving as a local process (asked for: DEPLOY_RUNTIME=process)")
        return None
    try:
        return runtimes.find_runtime(choice)
    except runtimes.ContainerError as err:
        if choice != "auto":
            raise RuntimeError(str(err)) from None
        print(f"deploy: serving as a local process: {err}")
        return None


def container_name(port: int) -> str:
    """One name per port: two deployments (say, the test suite's beside yours) on
    different ports do not take each other's container."""
    return f"textops-serving-{port}"


def up_container(runtime: runtimes.Runtime, bundle: Path, port: int, run_dir: Path,
                 host: str, timeout: float, files: dict[str, Path]) -> None:
    """Build the image and run it with the bundle's directory and `files` mounted
    read-only and the run directory writable."""
    name = container_name(port)
    host_dir, mounted_at, _ = container.bundle_mount(bundle)
    print(f"deploy: serving in a {runtime.name} container, {name} "
          f"({host_dir} mounted read-only at {mounted_at})")
    container.check_mountable(bundle)
    container.check_files_readable(files)
    build_log = run_dir / "image-build.log"
    print(f"deploy: building {image.IMAGE} (log: {build_log})")
    image.build(runtime, build_log, image.IMAGE)
    # Recorded before it starts, so `down` removes a container whose start failed
    # halfway (created, then the port refused), and one left by a crash goes first.
    (run_dir / "container.json").write_text(json.dumps({"runtime": runtime.name,
                                                        "name": name}) + "\n")
    container.stop(runtime, name)
    # run_dir becomes the container's run/: its prediction log is the host's
    # run/predictions.db, as with a local process
    container.start(runtime, image.IMAGE, name, port, host, bundle, state_dir=run_dir,
                    files=files, passed=container.passed_settings())
    try:
        wait_ready(base_url(host, port, os.environ), timeout)
    except RuntimeError as err:
        raise runtimes.ContainerError(f"{err}\n{container.logs(runtime, name)}") from None


def up_process(bundle: Path, port: int, run_dir: Path, host: str, timeout: float,
               files: dict[str, Path]) -> None:
    env = {name: str(path.resolve()) for name, path in files.items()}
    service = start(bundle, port, run_dir / "service.log", host=host, env=env, detach=True)
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
                        choices=["auto", *runtimes.RUNTIMES, "process"],
                        help="auto: a Docker or Podman container if one works, else a process")
    parser.add_argument("--public-key", type=Path, default=None,
                        help="verify the bundle's signature with this PEM public key, and "
                             "have the service verify every bundle it loads")
    args = parser.parse_args()
    if args.action == "down":
        print(down(args.run_dir))
    elif args.action == "status":
        print(status(args.run_dir))
    else:
        try:
            url, log = up(args.bundle, args.port, args.run_dir, args.host, args.timeout,
                          args.runtime, args.public_key)
        except RuntimeError as err:
            sys.exit(f"deploy: {err}")
        _, meta = http_json("GET", f"{url}/metadata")
        print(f"\nThe model {meta.get('model_name')} {meta.get('version')} answers at {url}")
        print(f"  docs:  {url}/docs")
        if meta.get("task") == "image_classification":
            print(f"  try:   curl -s -X POST {url}/predict -F images=@picture.png")
        else:
            print(f"  try:   curl -s -X POST {url}/predict -H 'Content-Type: application/json' "
                  "-d '{\"texts\": [\"a gripping, beautifully acted film\"]}'")
        print(f"  stop:  textops undeploy   (log: {log})")


if __name__ == "__main__":
    main()
