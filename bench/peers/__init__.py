"""The serving frameworks a user would pick instead of our service, for the benchmark.

Each peer wraps the SAME int8 ONNX bundle and computes its answers with our own code
(`serving.bundle.Bundle` + `serving.engine.inference.infer`), so the benchmark compares only what
the framework adds: its HTTP layer, its batching, its processes and their IPC. A text
bundle takes texts; an image bundle takes PNG or JPEG files in base64, which each wrapper
decodes with the bundle's own `bundle.inputs.pixels` before `infer`.

    from bench.peers import prepare
    for peer in prepare(cores=2, items="texts"):  # or "images"; PeerServer, or
        with peer.running(bundle_dir, port, log, cores=2):  # PeerUnavailable (why)
            ...POST peer.bodies(texts, 16) to peer.path, check with peer.parse(answer)

| peer     | wrapper                      | route (POST): texts, images     | batching          |
|----------|------------------------------|---------------------------------|-------------------|
| MLServer | bench/peers/mlserver_runtime | /v2/models/textops/infer (V2)   | adaptive batching |
| LitServe | bench/peers/litserve_app     | /predict                        | LitAPI batching   |
| BentoML  | bench/peers/bentoml_service  | /classify, /classify_images     | adaptive batching |

The body holds the items under "texts" or "images" (for MLServer, the name of its V2
BYTES input tensor); the wrapper checks that they are what the bundle takes.

Each peer runs from its own virtual environment, build/peers/<peer>/venv, installed from
bench/peers/requirements-<peer>.txt (the framework pinned, plus numpy, onnxruntime,
tokenizers and pillow pinned as pyproject.toml's `serve` extra pins them, and for MLServer uvloop:
see that file; no torch, which `ensure_venv` checks after installing). A venv is
reused while its requirements file is unchanged (build/peers/<peer>/venv/.requirements
holds the file's sha256); an install that fails makes that peer a `PeerUnavailable`
whose reason ends with pip's last lines (the whole log: build/peers/<peer>/install.log).

The processes per peer follow each framework's own advice for CPU serving: one worker
process per core (see each peer's `settings["workers_rule"]` and the wrapper's
docstring for where that advice is written). Each worker runs onnxruntime with
cores // workers intra-op threads (so 1), so that workers x threads = cores: more
threads than cores only makes the workers' threads preempt each other.

What runs, with N = cores: MLServer, a main process (HTTP, gRPC, metrics, the batcher)
and N inference workers; LitServe, N HTTP server processes and N inference workers
around a manager process; BentoML, N workers that are each a whole server (HTTP, batch
dispatcher, model) under a circus arbiter.

The batching knobs match our service's where the framework has the same knob (64 per
batch, a 10 s request timeout), so a difference in the benchmark comes from how the
framework batches, not from different numbers. The unit of "64" differs: MLServer and
LitServe count requests, BentoML counts items (as our service does). The wait for a
batch to fill is 2 ms, where our service waits 0: measured both ways on 2026-11-24
(1 and 16 texts per request, concurrency 8 and 32), MLServer and BentoML did better
with 2 ms at every point (up to 2.8x and 4.5x) and LitServe about the same, so each
peer gets its better one.
Per-request access logs are off everywhere, as in our service.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BUILD = ROOT / "build" / "peers"
HOST = "127.0.0.1"
MODEL_NAME = "textops"  # MLServer's model name (its route carries it)
READY_TIMEOUT_S = 180.0
STOP_GRACE_S = 10.0

# The batching knobs, shared by the peers: our service's batch size and timeout
# (serving/settings.py: max_batch_size 64, request_timeout_s 10), and the wait that
# suits the peers best (see above; BENCH_PEER_MAX_WAIT_MS to try another).
MAX_BATCH = 64
MAX_WAIT_S = float(os.environ.get("BENCH_PEER_MAX_WAIT_MS", "2")) / 1000
REQUEST_TIMEOUT_S = 10


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now (the OS picks it for a socket bound to port 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def threads_per_worker(workers: int, cores: int) -> int:
    """onnxruntime intra-op threads for each of `workers` processes on `cores` cores."""
    return max(1, cores // max(1, workers))


def _tail(path: Path, lines: int = 25) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


# ------------------------------------------------------------------- the interface


@dataclass
class PeerServer:
    """One framework, installed and ready to start. Subclasses say how to start it
    (`_command`) and how its requests and answers look (`bodies`, `parse`)."""

    name: str  # e.g. "MLServer"
    version: str  # the framework's version, read from the venv
    settings: dict  # what is configured (the bench prints it)
    path: str  # the route the load generator POSTs to
    ready_path: str  # GET route answering 200 once the model is loaded
    python: Path = field(repr=False, default=Path())  # the venv's interpreter
    key: str = field(repr=False, default="")  # build/peers/<key>
    items: str = "texts"  # what the bundle takes: "texts", or "images" (base64 files)

    def bodies(self, items: list[str], per_request: int) -> list[bytes]:
        """Request bodies, `per_request` items each, in order (a last, short chunk is
        dropped, as the bench does for our service)."""
        return [self._body(items[i : i + per_request])
                for i in range(0, len(items) - per_request + 1, per_request)]

    def parse(self, body: bytes) -> list[tuple[str, list[float]]]:
        """(label, probabilities) per item of an answer body, in the request's order."""
        raise NotImplementedError

    def _body(self, items: list[str]) -> bytes:
        raise NotImplementedError

    def _command(self, bundle_dir: Path, port: int, run_dir: Path, cores: int
                 ) -> tuple[list[str], dict[str, str]]:
        """The command line and the extra environment that start the server."""
        raise NotImplementedError

    @contextlib.contextmanager
    def running(self, bundle_dir: Path, port: int, log: Path, cores: int
                ) -> Iterator[tuple[int, subprocess.Popen]]:
        """Start on 127.0.0.1:`port`, wait until `ready_path` answers 200, yield
        (port, the server's process), and
        always stop the whole process group (SIGTERM, then SIGKILL after 10 s to
        anything left of the server's session: see `stop_group`).

        RuntimeError, with the log's tail, if the server exits or is not ready within
        180 s. The server runs in build/peers/<peer>/run/<port>-*/ (its working
        directory: files a framework writes land there), removed afterwards.
        """
        self.settings = self._settings(cores)
        run_root = BUILD / self.key / "run"
        run_root.mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix=f"{port}-", dir=run_root))
        command, extra_env = self._command(Path(bundle_dir).resolve(), port, run_dir, cores)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **extra_env}
        log = Path(log)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            process = subprocess.Popen(command, cwd=run_dir, env=env, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        try:
            self._wait_ready(process, port, log)
            yield port, process
        finally:
            stop_group(process)
            shutil.rmtree(run_dir, ignore_errors=True)

    def _wait_ready(self, process: subprocess.Popen, port: int, log: Path) -> None:
        url = f"http://{HOST}:{port}{self.ready_path}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = "no answer"
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {process.returncode} "
                                   f"before it was ready; {log}:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
                    last = f"HTTP {response.status}"
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code}"
            except OSError as err:
                last = str(err)
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{self.name} not ready after {READY_TIMEOUT_S:.0f} s "
                                   f"({url}: {last}); {log}:\n{_tail(log)}")
            time.sleep(0.25)

    def _settings(self, cores: int) -> dict:
        raise NotImplementedError


@dataclass
class PeerUnavailable:
    name: str
    reason: str


def session_members(sid: int) -> list[int]:
    """Live processes of session `sid` (zombies excluded). A server started with
    start_new_session leads session and group `sid`; its children stay in the session
    even when they make groups of their own (BentoML's circus gives every worker one)
    or lose their parent."""
    members = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp sid
        if fields[0] != "Z" and int(fields[3]) == sid:
            members.append(int(proc.name))
    return members


def stop_group(process: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM to the server's process group (the framework then stops its workers as
    it does in production), wait up to `grace` s for every process of its session to be
    gone, then SIGKILL whatever of the session is left."""
    sid = process.pid  # start_new_session: the leader's pid names its group and session

    def alive() -> list[int]:
        process.poll()  # reap the leader, or it lingers as a zombie
        return session_members(sid)

    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    for _ in range(50):
        left = alive()
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=1)


# ------------------------------------------------------------------- the peers


class MLServerPeer(PeerServer):
    """MLServer with a custom runtime (bench/peers/mlserver_runtime.py), spoken to in
    the V2 / Open Inference Protocol: a BYTES input tensor "texts" (or "images", base64
    strings: V2's JSON carries BYTES as strings) of shape [n]; the answer holds
    "probabilities" (FP32 [n, k]) and "label" (BYTES [n])."""

    def _settings(self, cores: int) -> dict:
        workers = max(1, cores)
        return {
            "workers": workers,
            "workers_rule": "parallel_workers = cores: Seldon Core 2 docs, performance "
                            "tuning > models > inference (MLServer's own docs: default 1)",
            "intra_op_threads": threads_per_worker(workers, cores),
            "adaptive_batching": True,
            "max_batch_size": f"{MAX_BATCH} requests",
            "max_batch_time_ms": MAX_WAIT_S * 1000,
            "grpc": "on a free port (cannot be turned off)",
            "metrics": "on a free port (the default, kept)",
            "access_log": False,
        }

    def _body(self, items: list[str]) -> bytes:
        return json.dumps({"inputs": [{"name": self.items, "datatype": "BYTES",
                                       "shape": [len(items)], "data": items}]}).encode()

    def parse(self, body: bytes) -> list[tuple[str, list[float]]]:
        outputs = {o["name"]: o for o in json.loads(body)["outputs"]}
        probs, labels = outputs["probabilities"], outputs["label"]
        n, k = probs["shape"]
        flat = probs["data"]
        return [(labels["data"][i], flat[i * k : (i + 1) * k]) for i in range(n)]

    def _command(self, bundle_dir, port, run_dir, cores):
        settings = self._settings(cores)
        # `mlserver start <folder>` reads <folder>/settings.json (the server) and every
        # model-settings.json below it (the models).
        server = {
            "host": HOST, "http_port": port, "grpc_port": free_port(),
            "metrics_port": free_port(), "metrics_dir": str(run_dir / "metrics"),
            "environments_dir": str(run_dir / "envs"),
            "parallel_workers": settings["workers"],
            "debug": False,  # True (the default) writes an access log line per request
        }
        model = {
            "name": MODEL_NAME,
            "implementation": "bench.peers.mlserver_runtime.TextClassifierRuntime",
            "max_batch_size": MAX_BATCH, "max_batch_time": MAX_WAIT_S,
            "parameters": {"uri": str(bundle_dir),
                           "extra": {"intra_op_threads": settings["intra_op_threads"]}},
        }
        (run_dir / "settings.json").write_text(json.dumps(server, indent=2))
        (run_dir / MODEL_NAME).mkdir()
        (run_dir / MODEL_NAME / "model-settings.json").write_text(json.dumps(model, indent=2))
        mlserver = self.python.parent / "mlserver"
        return [str(mlserver), "start", str(run_dir)], {}


class LitServePeer(PeerServer):
    """LitServe (bench/peers/litserve_app.py): POST /predict with {"texts": [...]} (or
    {"images": [base64, ...]}), answered {"predictions": [{"label": ...,
    "probabilities": [...]}, ...]}."""

    def _settings(self, cores: int) -> dict:
        workers = max(1, cores)
        return {
            "workers": workers,
            "workers_rule": "accelerator='cpu', workers_per_device = cores: LitServer "
                            "docstring / docs API reference (LitServer)",
            "api_servers": f"{workers} (num_api_servers=None: one per inference worker, "
                           "the documented default)",
            "intra_op_threads": threads_per_worker(workers, cores),
            "max_batch_size": f"{MAX_BATCH} requests",
            "batch_timeout_ms": MAX_WAIT_S * 1000,
            "timeout_s": REQUEST_TIMEOUT_S,
            "fast_queue": "True (ZeroMQ: the docs' advice above 100 requests/s)",
            "log_level": "warning",
        }

    def _body(self, items: list[str]) -> bytes:
        return json.dumps({self.items: items}).encode()

    def parse(self, body: bytes) -> list[tuple[str, list[float]]]:
        return [(p["label"], p["probabilities"]) for p in json.loads(body)["predictions"]]

    def _command(self, bundle_dir, port, run_dir, cores):
        settings = self._settings(cores)
        env = {"TEXTOPS_PEER_BUNDLE": str(bundle_dir), "TEXTOPS_PEER_PORT": str(port),
               "TEXTOPS_PEER_HOST": HOST, "TEXTOPS_PEER_WORKERS": str(settings["workers"]),
               "TEXTOPS_PEER_THREADS": str(settings["intra_op_threads"]),
               "TEXTOPS_PEER_MAX_BATCH": str(MAX_BATCH),
               "TEXTOPS_PEER_MAX_WAIT_S": str(MAX_WAIT_S),
               "TEXTOPS_PEER_TIMEOUT_S": str(REQUEST_TIMEOUT_S)}
        return [str(self.python), "-m", "bench.peers.litserve_app"], env


class BentoMLPeer(PeerServer):
    """BentoML (bench/peers/bentoml_service.py) under `bentoml serve`: POST /classify
    with {"texts": [...]} (or /classify_images with {"images": [base64, ...]}), answered
    with a JSON list of {"label", "probabilities"}."""

    def _settings(self, cores: int) -> dict:
        workers = max(1, cores)
        return {
            "workers": workers,
            "workers_rule": "workers = 'cpu_count' for CPU workloads: BentoML docs, "
                            "Build with BentoML > Parallelize requests handling",
            "intra_op_threads": threads_per_worker(workers, cores),
            "adaptive_batching": True,
            "max_batch_size": f"{MAX_BATCH} {self.items}",
            "max_latency_ms": REQUEST_TIMEOUT_S * 1000,
            "timeout_s": REQUEST_TIMEOUT_S,
            "access_log": False,
        }

    def _body(self, items: list[str]) -> bytes:
        return json.dumps({self.items: items}).encode()

    def parse(self, body: bytes) -> list[tuple[str, list[float]]]:
        return [(p["label"], p["probabilities"]) for p in json.loads(body)]

    def _command(self, bundle_dir, port, run_dir, cores):
        settings = self._settings(cores)
        env = {"TEXTOPS_PEER_BUNDLE": str(bundle_dir),
               "TEXTOPS_PEER_WORKERS": str(settings["workers"]),
               "TEXTOPS_PEER_THREADS": str(settings["intra_op_threads"]),
               "TEXTOPS_PEER_MAX_BATCH": str(MAX_BATCH),
               "TEXTOPS_PEER_MAX_LATENCY_MS": str(REQUEST_TIMEOUT_S * 1000),
               "TEXTOPS_PEER_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
               # its home (model store, logs) inside build/, and no usage reports
               "BENTOML_HOME": str(BUILD / self.key / "home"),
               "BENTOML_DO_NOT_TRACK": "true"}
        bentoml = self.python.parent / "bentoml"
        return [str(bentoml), "serve", "bench.peers.bentoml_service:TextClassifier",
                "--working-dir", str(ROOT), "--host", HOST, "--port", str(port)], env


# name -> (venv key, distribution whose version is reported, class,
#          POST route for texts and for images, ready route)
PEERS: dict[str, tuple[str, str, type[PeerServer], dict[str, str], str]] = {
    "MLServer": ("mlserver", "mlserver", MLServerPeer,
                 dict.fromkeys(("texts", "images"), f"/v2/models/{MODEL_NAME}/infer"),
                 f"/v2/models/{MODEL_NAME}/ready"),
    "LitServe": ("litserve", "litserve", LitServePeer,
                 dict.fromkeys(("texts", "images"), "/predict"), "/health"),
    "BentoML": ("bentoml", "bentoml", BentoMLPeer,
                {"texts": "/classify", "images": "/classify_images"}, "/readyz"),
}


# ------------------------------------------------------------------- environments


class InstallError(RuntimeError):
    """A venv that could not be made; the message ends with the log's last lines."""


def ensure_venv(key: str) -> Path:
    """build/peers/<key>/venv installed from requirements-<key>.txt, reused while the
    file's sha256 matches the stamp; returns its python. Raises InstallError."""
    requirements = HERE / f"requirements-{key}.txt"
    home = BUILD / key
    venv = home / "venv"
    python = venv / "bin" / "python"
    stamp = venv / ".requirements"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if python.exists() and stamp.is_file() and stamp.read_text().strip() == digest:
        return python
    home.mkdir(parents=True, exist_ok=True)
    log = home / "install.log"
    steps = [
        # --clear: a changed requirements file starts from an empty venv, so nothing
        # from an earlier pin stays behind
        ("python -m venv", [sys.executable, "-m", "venv", "--clear", str(venv)]),
        (f"pip install -r {requirements.name}",
         [str(python), "-m", "pip", "install", "--no-input", "-r", str(requirements)]),
    ]
    started = time.monotonic()
    with open(log, "w") as out:
        for label, step in steps:
            out.write(f"$ {' '.join(step)}\n")
            out.flush()
            result = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=home)
            if result.returncode != 0:
                out.flush()
                raise InstallError(f"{label} failed (exit {result.returncode}); "
                                   f"{log}:\n{_tail(log, 15)}")
        # The peers serve an ONNX model: torch has no business there (and would make
        # the comparison unfair by its import time and memory).
        torch = subprocess.run([str(python), "-m", "pip", "show", "torch"],
                               capture_output=True, text=True)
        if torch.returncode == 0:
            raise InstallError(f"the requirements pulled in torch; see {log}")
        out.write(f"installed in {time.monotonic() - started:.0f} s\n")
    stamp.write_text(digest + "\n")
    return python


def installed_version(python: Path, distribution: str) -> str:
    result = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m, sys; "
                            "print(m.version(sys.argv[1]))", distribution],
        capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise InstallError(f"cannot read {distribution}'s version: {result.stderr[-500:]}")
    return result.stdout.strip()


def prepare(names: list[str] | None = None, cores: int = os.cpu_count() or 1,
            items: str = "texts") -> list[PeerServer | PeerUnavailable]:
    """Create/reuse each peer's venv and return what can run, each sending `items`
    ("texts", or "images" for an image bundle); never raises for one peer's failure
    (it comes back as PeerUnavailable with the reason)."""
    results: list[PeerServer | PeerUnavailable] = []
    for name in names or list(PEERS):
        if name not in PEERS:
            results.append(PeerUnavailable(name, f"unknown peer (known: {', '.join(PEERS)})"))
            continue
        key, distribution, cls, routes, ready_path = PEERS[name]
        try:
            python = ensure_venv(key)
            version = installed_version(python, distribution)
        except Exception as err:  # noqa: BLE001 - one peer's failure must not stop the rest
            results.append(PeerUnavailable(name, str(err)))
            continue
        peer = cls(name=name, version=version, settings={}, path=routes[items],
                   ready_path=ready_path, python=python, key=key, items=items)
        peer.settings = peer._settings(cores)
        results.append(peer)
    return results
