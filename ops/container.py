"""Building and running the serving image with Docker or Podman.

`make image`, `make deploy` (through ops.control) and the image test use it:

    python -m ops.container runtime                 # which runtime works, or why none
    python -m ops.container build [--bundle DIR] [--tag TAG] [--runtime NAME]

A runtime works when its `info` succeeds: a `docker` client without an engine does
not. The Dockerfile's default base, python:3.11-slim, comes from a registry; where no
registry answers, a Debian bookworm root made by mmdebstrap (Python 3.11 from Debian) is
imported as the base instead, once a day, and passed as the BASE_IMAGE build argument.

Like ops.control, this module is the standard library only: it lives beside the
code that starts the service as a process, and imports neither torch nor pipeline/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "textops-serving:latest"
DEFAULT_BASE = "docker.io/library/python:3.11-slim"  # the Dockerfile's default, spelt out
BASE_REPOSITORY = "localhost/textops-base"
RUNTIMES = ("docker", "podman")
# What the image is built from: the Dockerfile and what its COPY lines name.
CONTEXT_FILES = ("Dockerfile", "pyproject.toml", "serving")
# Host files that let pip inside the build reach PyPI as pip outside does (a proxy's CA,
# an index, constraints); mounted read-only where they exist (Podman only: `docker
# build` mounts nothing).
PIP_HOST_FILES = ("/etc/ssl/certs", "/etc/pip.conf", "/etc/xdg/pip")
MOUNTED_BUNDLE = "/models"  # the Dockerfile's TEXTOPS_BUNDLE is /models/current
IMAGE_USER = 10001  # the Dockerfile's USER
# The image's WORKDIR/run: where the service keeps what it writes by default (its
# prediction log, sqlite:///run/predictions.db).
STATE_DIR = "/home/app/run"


class ContainerError(RuntimeError):
    """A container runtime, build or run that failed; the message says which and why."""


@dataclass(frozen=True)
class Runtime:
    """A container runtime's command line: `docker` or `podman`."""

    name: str

    def command(self, *args: str) -> list[str]:
        if self.name == "podman" and shutil.which("runc"):
            # crun, podman's usual default, refuses cgroup set-ups that runc accepts
            return ["podman", "--runtime", "runc", *args]
        return [self.name, *args]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a runtime command; ContainerError with its last error lines if it fails."""
        try:
            result = subprocess.run(self.command(*args), capture_output=True, text=True,
                                    timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ContainerError(f"`{self.name} {args[0]}` took over {timeout:.0f} s") from None
        if result.returncode != 0:
            raise ContainerError(f"`{self.name} {' '.join(args[:2])}` failed "
                                 f"({result.returncode}): {last_lines(result.stderr)}")
        return result

    def has_image(self, image: str) -> bool:
        return subprocess.run(self.command("image", "inspect", image), capture_output=True,
                              stdin=subprocess.DEVNULL).returncode == 0


def last_lines(text: str, count: int = 5) -> str:
    return "\n".join(text.strip().splitlines()[-count:]) or "no output"


# ---------------------------------------------------------------- which runtime


def why_not(name: str) -> str | None:
    """None when runtime `name` can run containers here, else the reason it cannot."""
    if shutil.which(name) is None:
        return f"{name}: not installed"
    try:
        result = subprocess.run(Runtime(name).command("info"), capture_output=True,
                                text=True, timeout=30, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"{name}: `{name} info` did not answer in 30 s"
    if result.returncode != 0:
        return f"{name}: `{name} info` failed ({last_lines(result.stderr, 1)})"
    return None


def find_runtime(choice: str = "auto") -> Runtime:
    """The runtime `choice` names, or for "auto" the first of docker, podman that works;
    ContainerError with every reason when none does."""
    candidates = RUNTIMES if choice == "auto" else (choice,)
    if choice not in (*RUNTIMES, "auto"):
        raise ContainerError(f"unknown container runtime {choice!r}: "
                             f"choose auto, {', '.join(RUNTIMES)}")
    reasons = []
    for name in candidates:
        reason = why_not(name)
        if reason is None:
            return Runtime(name)
        reasons.append(reason)
    raise ContainerError("no container runtime works (" + "; ".join(reasons) + ")")


# ---------------------------------------------------------------- the base image


def base_image(runtime: Runtime, log=print) -> str:
    """The BASE_IMAGE to build on: $TEXTOPS_BASE_IMAGE if set, else python:3.11-slim
    when it is here or can be pulled, else a Debian base made here (`debian_base`)."""
    chosen = os.environ.get("TEXTOPS_BASE_IMAGE")
    if chosen:
        return chosen
    if runtime.has_image(DEFAULT_BASE):
        return DEFAULT_BASE
    if runtime.has_image(todays_debian_base()):
        return todays_debian_base()  # made today because no registry answered
    try:
        runtime.run("pull", DEFAULT_BASE, timeout=300)
        return DEFAULT_BASE
    except ContainerError as err:
        log(f"image: {DEFAULT_BASE} cannot be pulled, so the base is made from Debian "
            f"packages ({last_lines(str(err), 1)})")
    return debian_base(runtime, log)


# Documentation, manual pages and translations: 46 MB of the base that nothing reads.
SLIM_DPKG_OPTIONS = ("path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
                     "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
                     "path-exclude=/usr/share/locale/*")


def todays_debian_base() -> str:
    return f"{BASE_REPOSITORY}:bookworm-{dt.date.today():%Y%m%d}"


def debian_base(runtime: Runtime, log=print) -> str:
    """A Debian bookworm root with Python 3.11 and its venv module, made by mmdebstrap
    and imported as an image: no registry needed, only a Debian mirror. Made once a
    day (a day's base gets that day's security updates); older days' tags are removed."""
    tag = todays_debian_base()
    if runtime.has_image(tag):
        return tag
    if shutil.which("mmdebstrap") is None:
        raise ContainerError("no registry answered and mmdebstrap is not installed to make "
                             "a base image (apt-get install mmdebstrap, or set "
                             "TEXTOPS_BASE_IMAGE to an image with Python 3.11)")
    log(f"image: making the base {tag} with mmdebstrap")
    with tempfile.TemporaryDirectory(prefix="textops-base-") as tmp:
        tarball = Path(tmp) / "base.tar"
        command = ["mmdebstrap", "--quiet", "--variant=apt",
                   "--include=python3,python3-venv,ca-certificates",
                   *(f"--dpkgopt={option}" for option in SLIM_DPKG_OPTIONS),
                   "bookworm", str(tarball)]
        # stdin closed: without a mirror argument mmdebstrap reads sources from a
        # non-terminal stdin; empty, it takes deb.debian.org
        result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise ContainerError(f"mmdebstrap failed ({result.returncode}): "
                                 f"{last_lines(result.stderr)}")
        runtime.run("import", str(tarball), tag, timeout=300)
    remove_older_bases(runtime, keep=tag)
    return tag


def remove_older_bases(runtime: Runtime, keep: str) -> None:
    listed = subprocess.run(runtime.command("images", "--format", "{{.Repository}}:{{.Tag}}",
                                            BASE_REPOSITORY),
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    for tag in listed.stdout.split():
        if tag != keep and tag.startswith(f"{BASE_REPOSITORY}:"):
            # an image built on it keeps its layers; only the name goes
            subprocess.run(runtime.command("rmi", tag), capture_output=True,
                           stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------- build


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


def stage_context(directory: Path, bundle: Path | None) -> None:
    """Copy what the Dockerfile reads into `directory`; a bundle goes to `bundle/`.

    A context of its own keeps .venv, data and checkpoints (gigabytes) out of the
    build, and lets the baked bundle come from anywhere, not only from under the
    repository.
    """
    for name in CONTEXT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, directory / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, directory / name)
    if bundle is not None:
        # the resolved directory: `models/current` is a link, COPY would copy the link
        shutil.copytree(Path(bundle).resolve(), directory / "bundle")
        # world-readable in the image whatever the source's modes (a bundle written
        # before bundles were 0644 is 0600 in parts): the image's user reads it
        for path in [directory / "bundle", *(directory / "bundle").rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def pip_env_config() -> str:
    """This process's PIP_* settings as a pip configuration file, for pip in the build
    (a build sees none of the caller's environment). A setting naming a host path the
    build cannot see (a local wheel directory) is left out."""
    lines = ["[global]"]
    for key, value in sorted(os.environ.items()):
        if key.startswith("PIP_") and key != "PIP_CONFIG_FILE" and seen_by_build(value):
            lines.append(f"{key.removeprefix('PIP_').lower().replace('_', '-')} = {value}")
    return "\n".join(lines) + "\n"


def seen_by_build(value: str) -> bool:
    """Whether a setting's value means the same inside the build: not a host path, or
    one under the host files mounted into it."""
    if not value.startswith("/"):
        return True
    return any(Path(value).is_relative_to(mounted) for mounted in PIP_HOST_FILES)


def build_command(runtime: Runtime, tag: str, base: str, context: Path,
                  bundle: bool, pip_config: Path | None) -> list[str]:
    """The build command line: the `baked` stage with a bundle, else `runtime`."""
    args = ["build", "--build-arg", f"BASE_IMAGE={base}",
            "--target", "baked" if bundle else "runtime", "-t", tag]
    if bundle:
        args += ["--build-arg", "BUNDLE=bundle"]
    if runtime.name == "podman":
        # the host's network, as pip outside reaches PyPI (BuildKit would want an
        # entitlement for it, and Docker's own build network reaches what the host does)
        args.append("--network=host")
        args += ["--format", "docker"]  # the OCI format has no HEALTHCHECK
        args += [f"--volume={path}:{path}:ro" for path in PIP_HOST_FILES
                 if Path(path).exists()]
        if pip_config is not None:
            args.append(f"--volume={pip_config}:/root/.config/pip/pip.conf:ro")
    return runtime.command(*args, str(context))


def build(runtime: Runtime, log_path: Path, tag: str = IMAGE, bundle: Path | None = None,
          base: str | None = None, log=print) -> str:
    """Build the image (the bundle baked in when one is given) and return its tag.
    The build's output goes to `log_path`; ContainerError names it and its last lines."""
    if bundle is not None and not (Path(bundle) / "bundle.json").exists():
        raise ContainerError(f"{bundle}: not a bundle (no bundle.json)")
    base = base or base_image(runtime, log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="textops-image-") as tmp:
        context, pip_config = Path(tmp) / "context", Path(tmp) / "pip-env.conf"
        context.mkdir()
        stage_context(context, bundle)
        pip_config.write_text(pip_env_config())
        command = build_command(runtime, tag, base, context, bundle is not None, pip_config)
        with open(log_path, "w") as out:
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, timeout=1800)
    if result.returncode != 0:
        raise ContainerError(f"`{runtime.name} build` failed ({result.returncode}), "
                             f"log {log_path}:\n{last_lines(log_path.read_text(), 15)}")
    return tag


def image_size(runtime: Runtime, image: str) -> int:
    """The image's size in bytes, as the runtime reports it (uncompressed layers)."""
    return int(runtime.run("image", "inspect", "--format", "{{.Size}}", image).stdout)


# ---------------------------------------------------------------- run


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
             state_dir: Path | None = None) -> list[str]:
    """Arguments of `run` for the image as container `name`, its port 8000 published
    on host:port only; `bundle` is mounted read-only (else the image's baked one
    serves); `state_dir` receives what the service writes (`state_args`).
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
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    return [*args, image]


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


def start(runtime: Runtime, image: str, name: str, port: int, host: str,
          bundle: Path | None, state_dir: Path | None = None) -> None:
    """Run the image in the background as container `name`, kept after it exits so
    its log can tell why (`stop` removes it)."""
    runtime.run(*run_args(runtime, image, name, port, host, bundle, detach=True,
                          remove=False, state_dir=state_dir))


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


# ---------------------------------------------------------------- command line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["runtime", "build"])
    parser.add_argument("--runtime", default=os.environ.get("CONTAINER_RUNTIME", "auto"),
                        help="auto (docker, else podman), docker or podman")
    parser.add_argument("--bundle", type=Path, help="bake this bundle into the image")
    parser.add_argument("--tag", help=f"image tag ({IMAGE}; textops-serving:<version> "
                                      "with --bundle)")
    parser.add_argument("--log", type=Path, default=Path("build/image/build.log"))
    args = parser.parse_args()
    try:
        runtime = find_runtime(args.runtime)
        if args.action == "runtime":
            print(runtime.name)
            return
        tag = args.tag or (IMAGE if args.bundle is None
                           else f"textops-serving:{bundle_version(args.bundle)}")
        print(f"image: building {tag} with {runtime.name} (log: {args.log})")
        build(runtime, args.log, tag, args.bundle)
        print(f"image: {tag} built with {runtime.name}, "
              f"{image_size(runtime, tag) / 1e6:.0f} MB")
    except (ContainerError, OSError) as err:
        sys.exit(f"image: {err}")


def bundle_version(bundle: Path) -> str:
    meta = Path(bundle) / "bundle.json"
    try:
        return json.loads(meta.read_text())["version"]
    except (OSError, ValueError, KeyError) as err:
        raise ContainerError(f"{meta}: no bundle version ({err})") from None


if __name__ == "__main__":
    main()
