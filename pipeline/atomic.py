"""Atomic outputs: a stage writes into a temporary sibling and renames it into place.

A stage killed halfway therefore leaves either the previous output or nothing, never
a directory or file that looks complete but is not.

Outputs are readable by everyone (files 0644, directories 0755), whatever the umask
and although mkstemp / mkdtemp make private ones: the serving image runs as another
user than the one who built the bundle, and reads it from a read-only mount.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILE_MODE = 0o644
DIR_MODE = 0o755


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `target` when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        make_readable(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, target)


def make_readable(root: Path) -> None:
    """Give `root` and everything under it the modes of ordinary outputs: what the
    block wrote there may come from mkstemp (0600), a library, or a strict umask."""
    root.chmod(DIR_MODE)
    for directory, subdirs, files in os.walk(root):
        for name, mode in [(d, DIR_MODE) for d in subdirs] + [(f, FILE_MODE) for f in files]:
            path = os.path.join(directory, name)
            if not os.path.islink(path):  # a link has no mode of its own
                os.chmod(path, mode)


def replace_dir(src: Path, target: Path) -> None:
    """Move directory `src` to `target`, replacing what is there.

    rename(2) cannot replace a non-empty directory, so the old one is first renamed
    aside; a reader sees the old or the new directory, or briefly none, never a mix.
    """
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(src, target)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp's file is private; an output is not
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
