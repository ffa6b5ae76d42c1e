"""The base the serving image is built on (the Dockerfile's BASE_IMAGE build argument).

The Dockerfile's default base, python:3.11-slim, comes from a registry; where no
registry answers, a Debian bookworm root made by mmdebstrap (Python 3.11 from Debian) is
imported as the base instead, once a day. ops/image.py asks `base_image` for it.

The standard library only, like the rest of ops/.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ops.runtimes import ContainerError, Runtime, last_lines

DEFAULT_BASE = "docker.io/library/python:3.11-slim"  # the Dockerfile's default, spelt out
BASE_REPOSITORY = "localhost/textops-base"
# Documentation, manual pages and translations: 46 MB of the base that nothing reads.
SLIM_DPKG_OPTIONS = ("path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
                     "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
                     "path-exclude=/usr/share/locale/*")


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
