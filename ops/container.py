"""Running the serving image as a container with Docker or Podman: its run command
line, the bundle and state directories it mounts, and starting, stopping and reading
the logs of a container.

`make deploy` (ops/control.py) starts, stops and reads containers through this module;
tests/ops/test_image.py runs the images ops/image.py builds through `run_args`.

The standard library only, like the rest of ops/.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

from ops.runtimes import ContainerError, Runtime

MOUNTED_BUNDLE = "/models"  # the Dockerfile's TEXTOPS_BUNDLE is /models/current
IMAGE_USER = 10001  # the Dockerfile's USER
# The image's WORKDIR/run: where the service keeps what it writes by default (its
# prediction log, sqlite:///run/predictions.db).
STATE_DIR = "/home/app/run"
# Where files named by settings (a certificate, its key, the bundles' public key, the
# prediction log's key file) are mounted, one read-only file each, named after its
# variable.
FILES_DIR = "/etc/textops"
# The settings from the environment that name such a file (`make deploy` mounts each
# one that is set), and those passed by name alone (`--env NAME`): the runtime copies
# the value from its own environment, so no key shows on a command line (`ps` shows
# those to every user). Without them a container would not get what a local process
# inherits, and would write the prediction log in plaintext, or serve plain HTTP,
# while the environment asks for keys or TLS.
FILE_SETTINGS = ("TEXTOPS_TLS_CERT_FILE", "TEXTOPS_TLS_KEY_FILE",
                 "TEXTOPS_PREDICTION_LOG_KEY_FILE")
PASSED_BY_NAME = ("TEXTOPS_PREDICTION_LOG_KEYS", "TEXTOPS_REQUIRE_TLS",
                  "TEXTOPS_REQUIRE_LOG_ENCRYPTION")


def bundle_mount(bundle: Path) -> tuple[Path, str, str]:
    """(host directory, where it is mounted, TEXTOPS_BUNDLE) to serve `bundle` mounted.

    `models/current` is a link relative to models/ (to bundles/<version>): mounting
    models/ keeps it resolvable, and the service follows it when a promotion moves it.
    A bundle that is not such a link is mounted alone.
    """
    bundle = Path(bundle).absolute()
    holder = bundle.parent.resolve()
    if (bundle.is_symlink() and not os.path.isabs(os.readlink(bundle))
            and bundle.resolve().is_relative_to(holder)):
        return holder, MOUNTED_BUNDLE, f"{MOUNTED_BUNDLE}/{bundle.name}"
    return bundle.resolve(), f"{MOUNTED_BUNDLE}/bundle", f"{MOUNTED_BUNDLE}/bundle"


def run_args(runtime: Runtime, image: str, name: str, port: int, host: str = "127.0.0.1",
             bundle: Path | None = None, env: dict | None = None,
             detach: bool = False, remove: bool = True,
             state_dir: Path | None = None, files: dict | None = None,
             passed: Iterable[str] = ()) -> list[str]:
    """Arguments of `run` for the image as container `name`, its port 8000 published
    on host:port only; `bundle` is mounted read-only (else the image's baked one
    serves); `state_dir` receives what the service writes (`state_args`); `files`
    ({variable: host file}) are mounted read-only, each variable naming its file there;
    the variables `passed` get their values from the runtime's environment.
    `runtime.command(*run_args(...))` is the command line."""
    args = ["run", "--name", name, "--publish", f"{host}:{port}:8000"]
    if detach:
        args.append("--detach")
    if remove:
        args.append("--rm")
    if runtime.name == "podman" and not Path("/run/systemd/private").exists():
        # podman runs healthchecks with systemd timers; without systemd each start
        # logs an error and no check runs (Docker's engine runs them itself)
        args.append("--no-healthcheck")
    if bundle is not None:
        host_dir, mounted_at, inside = bundle_mount(bundle)
        args += ["--volume", f"{host_dir}:{mounted_at}:ro", "--env", f"TEXTOPS_BUNDLE={inside}"]
    if state_dir is not None:
        args += state_args(runtime, state_dir)
    for variable, host_file in (files or {}).items():
        inside = f"{FILES_DIR}/{variable.lower()}"
        args += ["--volume", f"{Path(host_file).resolve()}:{inside}:ro",
                 "--env", f"{variable}={inside}"]
    for variable in passed:
        args += ["--env", variable]  # no value: copied from the environment
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    return [*args, image]


def passed_settings(environ=os.environ) -> list[str]:
    """The PASSED_BY_NAME variables set in `environ`, for `run_args(passed=...)`."""
    return [name for name in PASSED_BY_NAME if name in environ]


def state_args(runtime: Runtime, state_dir: Path) -> list[str]:
    """Mount `state_dir` writable as the container's run/, so that what the service
    writes there (its prediction log) lands where a local process would write it, and
    `make retrain` reads it on the host.

    The container's user must be able to write it: root hands the directory to the
    image's user; anyone else runs the container as themselves (rootless Podman
    keeping their uid), still not root.
    """
    args = ["--volume", f"{Path(state_dir).resolve()}:{STATE_DIR}"]
    if os.geteuid() == 0:
        for path in [Path(state_dir), *Path(state_dir).rglob("*")]:
            os.chown(path, IMAGE_USER, IMAGE_USER, follow_symlinks=False)
    else:
        args += ["--user", f"{os.geteuid()}:{os.getegid()}"]
        if runtime.name == "podman":
            args.append("--userns=keep-id")
    return args


def check_mountable(bundle: Path) -> None:
    """ContainerError naming what the image's user could not read once `bundle` is
    mounted: the mounted directory itself, or any file of the bundle."""
    host_dir, _, _ = bundle_mount(bundle)
    problems = unreadable(bundle)
    if host_dir.stat().st_mode & 0o005 != 0o005:
        problems.insert(0, f"{host_dir} (mode {host_dir.stat().st_mode & 0o777:o})")
    if problems:
        raise ContainerError("the image's user (uid 10001) cannot read "
                             f"{', '.join(problems[:3])}: chmod -R a+rX {host_dir}")


def check_files_readable(files: dict) -> None:
    """ContainerError naming a file of `files` that the image's user could not read:
    run by root, the container runs as that user (`state_args`), and a private key is
    usually its owner's alone."""
    if os.geteuid() != 0:
        return  # the container runs as this user, who can read them
    closed = [f"{path} (mode {Path(path).stat().st_mode & 0o777:o})"
              for path in files.values() if Path(path).stat().st_mode & 0o004 == 0]
    if closed:
        raise ContainerError(f"the image's user (uid {IMAGE_USER}) cannot read "
                             f"{', '.join(closed)}")


def unreadable(bundle: Path) -> list[str]:
    """Files and directories of `bundle` that other users cannot read (or enter): the
    image's user cannot serve them."""
    bundle = Path(bundle).resolve()
    found = []
    for path in [bundle, *bundle.rglob("*")]:
        mode = path.stat().st_mode
        needed = 0o005 if path.is_dir() else 0o004
        if mode & needed != needed:
            found.append(f"{path} (mode {mode & 0o777:o})")
    return found


def start(runtime: Runtime, image: str, name: str, port: int, host: str,
          bundle: Path | None, state_dir: Path | None = None,
          files: dict | None = None, passed: Iterable[str] = ()) -> None:
    """Run the image in the background as container `name`, kept after it exits so
    its log can tell why (`stop` removes it)."""
    runtime.run(*run_args(runtime, image, name, port, host, bundle, detach=True,
                          remove=False, state_dir=state_dir, files=files, passed=passed))


def stop(runtime: Runtime, name: str, timeout: int = 30) -> None:
    """SIGTERM the container (SIGKILL after `timeout` s) and remove it; fine when it
    does not exist."""
    for args in (("stop", "-t", str(timeout), name), ("rm", "--force", name)):
        subprocess.run(runtime.command(*args), capture_output=True, stdin=subprocess.DEVNULL,
                       timeout=timeout + 30)


def logs(runtime: Runtime, name: str, lines: int = 30) -> str:
    result = subprocess.run(runtime.command("logs", "--tail", str(lines), name),
                            capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            timeout=30)
    return (result.stdout + result.stderr).strip()

