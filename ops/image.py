"""Building the serving image with Docker or Podman: `make image`.

    python -m ops.image runtime                 # which runtime works, or why none
    python -m ops.image build [--bundle DIR] [--tag TAG] [--runtime NAME]

The build context is staged apart from the repository (the Dockerfile and what its
COPY lines name, and a bundle to bake in), and the base is the one ops/base_image.py
chooses, passed as the BASE_IMAGE build argument. `make deploy` (ops/control.py) builds
through `build` too; ops/container.py runs what it built.

The standard library only, like the rest of ops/: it imports neither torch nor pipeline/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ops.base_image import base_image
from ops.runtimes import ContainerError, Runtime, find_runtime, last_lines

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "textops-serving:latest"
# What the image is built from: the Dockerfile and what its COPY lines name.
CONTEXT_FILES = ("Dockerfile", "pyproject.toml", "serving")
# Host files that let pip inside the build reach PyPI as pip outside does (a proxy's CA,
# an index, constraints); mounted read-only where they exist (Podman only: `docker
# build` mounts nothing).
PIP_HOST_FILES = ("/etc/ssl/certs", "/etc/pip.conf", "/etc/xdg/pip")


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
