"""The service as a local process, and waiting for servers over HTTP.

`start` runs `python -m serving` on a port, `wait_ready` waits for its readiness and
`stop` drains and ends it: the serve stage's throw-away canary service, `make deploy`'s
local process (ops/control.py), the tests' and benchmarks' services. `free_port`,
`http_json` and `wait_until` are the standard-library HTTP helpers for any server
(this service, an MLflow server, ...). They take https URLs too: a service started with
`TEXTOPS_TLS_CERT_FILE` has one (`base_url`), and a certificate no public CA signed (a
self-signed one) is trusted by pointing OpenSSL's `SSL_CERT_FILE` at it.

ops/control.py imports these names again, so `control.start`, `control.free_port`, ...
keep working for the code that uses them there.

The standard library only, like the rest of ops/ (serving/ is not imported here).
"""

from __future__ import annotations

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path


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


def base_url(host: str, port: int, environment: Mapping[str, str]) -> str:
    """The address of a service started with `environment`: https when it has a
    certificate (serving/tls.py)."""
    tls = environment.get("TEXTOPS_TLS_CERT_FILE", "").strip()
    return f"{'https' if tls else 'http'}://{host}:{port}"


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
    return Service(process=process, url=base_url(host, port, environment),
                   log_path=log_path)


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
