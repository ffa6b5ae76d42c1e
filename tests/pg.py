"""A throw-away PostgreSQL server for tests: a new cluster in a temporary directory, on a
free loopback port, always stopped afterwards. Debian's `postgresql` package provides it;
where it cannot start, tests that need it skip and say why."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from ops.control import free_port


def server_binaries() -> Path | None:
    """The directory holding initdb and pg_ctl (Debian keeps them off PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_server_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the `postgres` user then."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


def _chown_to_server_user(path: Path) -> None:
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(path, user.pw_uid, user.pw_gid)


@contextlib.contextmanager
def postgres_server(database: str = "textops"):
    """Start a cluster in a directory of its own under the system's temporary directory
    (as root the server runs as `postgres`, which cannot enter pytest's root-only
    temporary tree); yield it, its URL `postgresql://postgres@127.0.0.1:<port>/<database>`
    as `.url`; stop it and remove the directory afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="textops-pg-"))
    try:
        with _cluster(directory, database) as server:
            yield server
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def _cluster(directory: Path, database: str):
    binaries = server_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries not found (Debian package `postgresql`)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no `postgres` user to run the server as")
    directory.chmod(0o755)
    _chown_to_server_user(directory)
    data, log = directory / "data", directory / "server.log"
    init = subprocess.run(_as_server_user([str(binaries / "initdb"), "-D", str(data), "-U",
                                           "postgres", "--auth=trust", "--no-sync"]),
                          capture_output=True, text=True)
    if init.returncode != 0:
        pytest.skip(f"initdb could not create a cluster: {init.stderr.strip()[-300:]}")
    # The port is chosen just before the server binds it, and again if another process
    # (a second pytest-xdist worker's server) took it in between.
    for _ in range(3):
        port = free_port()
        options = (f"-c listen_addresses=127.0.0.1 -p {port} "
                   f"-c unix_socket_directories={directory}")
        start = subprocess.run(_as_server_user([str(binaries / "pg_ctl"), "-D", str(data),
                                                "-l", str(log), "-o", options, "-w", "-t",
                                                "60", "start"]), capture_output=True, text=True)
        if start.returncode == 0 or not log.exists() \
                or "already in use" not in log.read_text(errors="replace"):
            break
    if start.returncode != 0:
        pytest.skip(f"PostgreSQL did not start: {start.stderr.strip()[-300:]}")
    try:
        subprocess.run(_as_server_user([str(binaries / "createdb"), "-h",
                                        "127.0.0.1", "-p", str(port), "-U", "postgres",
                                        database]), check=True, capture_output=True)
        yield PostgresServer(f"postgresql://postgres@127.0.0.1:{port}/{database}",
                             binaries, data, log, options)
    finally:
        subprocess.run(_as_server_user([str(binaries / "pg_ctl"), "-D", str(data), "-m",
                                        "immediate", "stop"]), capture_output=True)


class PostgresServer:
    """A running test cluster: its URL, and stop/start for fault tests."""

    def __init__(self, url: str, binaries: Path, data: Path, log: Path, options: str):
        self.url, self.binaries, self.data, self.log, self.options = (
            url, binaries, data, log, options)

    def stop(self) -> None:
        subprocess.run(_as_server_user([str(self.binaries / "pg_ctl"), "-D", str(self.data),
                                        "-m", "fast", "-w", "stop"]), check=True,
                       capture_output=True)

    def start(self) -> None:
        subprocess.run(_as_server_user([str(self.binaries / "pg_ctl"), "-D", str(self.data),
                                        "-l", str(self.log), "-o", self.options, "-w",
                                        "start"]), check=True, capture_output=True)

    def __str__(self) -> str:
        return self.url
