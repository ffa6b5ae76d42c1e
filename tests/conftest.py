"""Shared fixtures.

`smoke_repo` is the expensive one: a temporary copy of the repository in which
`dvc repro` has run the smoke experiment through all six stages. Tests that need a
trained model, a bundle or a registry reuse it instead of training their own.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from repo import copy_repo, git_init  # noqa: E402  (bench/repo.py: one way to copy the repo)

# Under pytest-xdist the workers share the machine's cores: one torch thread each, here
# and in the stages they start (unless a stage sets its own, as federated clients and
# tuning workers do), instead of every worker spinning on all of them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Tests choose their own tracking databases; an outer setting must not leak in.
os.environ.pop("MLFLOW_TRACKING_URI", None)

HAS_GPU = torch.cuda.is_available()
GPUS = torch.cuda.device_count()


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu(n)`: skipped unless n CUDA devices are present (RunIf-style)."""
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is None:
            continue
        needed = marker.args[0] if marker.args else 1
        if GPUS < needed:
            item.add_marker(pytest.mark.skip(reason=f"needs {needed} GPU(s), found {GPUS}"))


def compose(*overrides: str):
    """conf/ composed with overrides, resolved, as the stages would read it."""
    from pipeline.config import compose as compose_conf

    return compose_conf(list(overrides), ROOT / "conf")


@pytest.fixture
def smoke_cfg():
    return compose("experiment=smoke")


def run(cmd: list[str], cwd: Path, timeout: float = 600, env: dict | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                   **(env or {})}
    environment.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=environment)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="session")
def smoke_repo(tmp_path_factory) -> Path:
    """A repository copy where `dvc repro` ran the smoke experiment end to end."""
    repo = copy_repo(tmp_path_factory.mktemp("smoke") / "repo")
    run([sys.executable, "-m", "pipeline.config", "experiment=smoke"], repo)
    git_init(repo)
    result = run(["dvc", "repro"], repo, timeout=900)
    (repo / "repro.log").write_text(result.stdout + result.stderr)
    shutil.copy2(repo / "dvc.lock", repo / "repro.lock")  # later tests rerun stages
    return repo


@pytest.fixture(scope="session")
def image_repo(tmp_path_factory) -> Path:
    """A repository copy where `dvc repro` ran the image smoke experiment (600
    Fashion-MNIST images per split, the MLP, one epoch) end to end."""
    repo = copy_repo(tmp_path_factory.mktemp("image") / "repo")
    run([sys.executable, "-m", "pipeline.config", "task=image_classification",
         "experiment=image_smoke"], repo)
    git_init(repo)
    result = run(["dvc", "repro"], repo, timeout=900)
    (repo / "repro.log").write_text(result.stdout + result.stderr)
    return repo


@pytest.fixture(scope="session")
def next_word_repo(tmp_path_factory) -> Path:
    """A repository copy where `dvc repro` ran the next-word smoke experiment (the
    first 300 speeches of Tiny Shakespeare, a one-layer Transformer, one epoch) end to
    end."""
    repo = copy_repo(tmp_path_factory.mktemp("next-word") / "repo")
    run([sys.executable, "-m", "pipeline.config", "task=next_word",
         "experiment=next_word_smoke"], repo)
    git_init(repo)
    result = run(["dvc", "repro"], repo, timeout=900)
    (repo / "repro.log").write_text(result.stdout + result.stderr)
    return repo


@pytest.fixture(scope="session")
def image_bundle(image_repo) -> Path:
    return image_repo / "models/candidate"


@pytest.fixture(scope="session")
def image_service(image_bundle, tmp_path_factory):
    """The service on the image smoke bundle, with small image limits to test against;
    `log_dir` holds its prediction log."""
    log_dir = tmp_path_factory.mktemp("image-service")
    with running_service(image_bundle, log_dir, max_images=4, max_image_bytes=200_000,
                         max_body_bytes=2_000_000) as service:
        service.log_dir = log_dir
        yield service


@pytest.fixture(scope="session")
def garments(image_repo) -> list[bytes]:
    """Four test images as PNG files, the way a client has them."""
    from pipeline.config import Paths
    from pipeline.data.splits import load_splits
    from pipeline.tasks.image_classification.task import ImageClassification

    test = load_splits(Paths(image_repo).processed)["test"].select(range(4))
    return ImageClassification().requests(test)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A working directory where preprocess, train (2 epochs) and evaluate ran on a
    small synthetic data set, tracked in the directory's own MLflow database.

    Yields (path, cfg). Every stage takes `Paths(path)`; MLflow keeps its runs and
    artifacts there too.
    """
    from helpers import synthetic_rows, write_raw

    from pipeline.config import Paths
    from pipeline.modeling.training import fit
    from pipeline.stages.evaluate import evaluate
    from pipeline.tasks.text_classification.preprocess import preprocess

    path = tmp_path_factory.mktemp("workspace")
    cfg = compose("experiment=smoke")
    # a tokenizer trained on the synthetic words: small and quick
    cfg.preprocess.tokenizer.type = "wordpiece"
    cfg.preprocess.tokenizer.vocab_size = 300
    cfg.preprocess.tokenizer.min_frequency = 1
    cfg.train.init_embeddings = None
    cfg.train.max_epochs = 2
    cfg.train.lr = 5e-3
    cfg.mlflow.tracking_uri = tracking_in(path, cfg.mlflow.experiment)
    cfg.deploy.model_name = "synthetic-classifier"
    with restored_tracking_uri():
        write_raw(Paths(path).raw, {"train": synthetic_rows(400),
                                    "test": synthetic_rows(60, seed=1)})
        preprocess(cfg.preprocess, cfg.seed, Paths(path))
        fit(cfg, Paths(path))
    evaluate(cfg, Paths(path))
    return path, cfg


def tracking_in(root: Path, experiment: str) -> str:
    """A tracking URI of MLflow's in `root`, where `experiment` keeps its artifacts too
    (MLflow's default artifact root is relative to the working directory)."""
    import mlflow

    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, (root / "mlruns").as_uri())
    return uri


@contextlib.contextmanager
def restored_tracking_uri():
    """mlflow.set_tracking_uri() also sets MLFLOW_TRACKING_URI, which the stages read
    before a config's URI: clear it for the block and put back what was there."""
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


@contextlib.contextmanager
def publicly_seeded(seed: int = 0):
    """Seed torch, numpy and random as a public `seed` would for the block, then put
    back their states, so that no later test inherits them."""
    import random

    import numpy as np

    saved = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])


@contextlib.contextmanager
def inside(path: Path):
    """Run stage functions in `path`, leaving no working directory or tracking URI
    behind."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        with restored_tracking_uri():
            yield
    finally:
        os.chdir(previous)


@pytest.fixture(scope="session")
def built_bundle(workspace):
    """(bundle directory, bundle.json) exported once from the workspace's model."""
    from pipeline.config import Paths
    from pipeline.stages import deploy

    path, cfg = workspace
    meta = deploy.build_bundle(cfg, Paths(path))
    return Paths(path).candidate, meta


@contextlib.contextmanager
def running_service(bundle, log_dir: Path, wait: bool = True, **env):
    """The real service (`python -m serving` on uvicorn) on a free loopback port;
    keyword arguments become TEXTOPS_* settings. Always stopped afterwards."""
    from ops import control

    # Each service logs its predictions beside its own log, never into the repo's run/.
    env.setdefault("prediction_log", f"sqlite:///{log_dir / 'predictions.db'}")
    settings = {f"TEXTOPS_{k.upper()}": str(v) for k, v in env.items()}
    service = control.start(bundle, control.free_port(), log_dir / "service.log", env=settings)
    try:
        if wait:
            control.wait_ready(service.url, 60, service.process)
        yield service
    finally:
        control.stop(service.process)


def post_json(url: str, path: str, body) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=30)


def labelled(url: str, items: list[dict]) -> None:
    """Send labels to /feedback, again while the log has not caught up with the
    answers (503)."""
    eventually(lambda: post_json(url, "/feedback", items).status_code == 200)


def metric_samples(url: str) -> dict[str, float]:
    """Every sample of the service's /metrics, keyed by its name and labels as written."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def eventually(check, timeout: float = 20.0, interval: float = 0.1):
    """`check()`'s first truthy value within `timeout` s; AssertionError otherwise.
    For what another thread or server process does a moment later (a log writer, a
    sibling worker publishing its drift window every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {check}")
        time.sleep(interval)


def every_worker_shows(url: str, gauge: str, value: float, timeout: float = 20) -> None:
    """Wait until the unlabelled gauge `gauge` reads `value` on 16 scrapes in a row.
    Each server process keeps its own live figures (the one that stored feedback
    updates at once, its siblings a moment later), and each scrape is a new connection
    that may reach any of them."""
    from pipeline.loops.triggers import scrape

    eventually(lambda: all(scrape(url).get(gauge) == value for _ in range(16)), timeout)


def every_worker_serves(url: str, timeout: float = 60, **expected) -> dict:
    """Wait until every server process of the service at `url` serves a bundle with
    `expected` (e.g. model_version="v2" or identity="name/2"); returns /metadata.
    Workers follow a moved link or registry alias one by one, and any request may
    reach any of them."""
    def switched():
        metadata = httpx.get(f"{url}/metadata", timeout=10).json()
        workers = metadata.get("workers", [])
        return workers and all(all(worker[key] == value for key, value in expected.items())
                               for worker in workers) and metadata

    return eventually(switched, timeout, interval=0.2)


def send_without_reading(url: str, path: str, body: dict) -> http.client.HTTPConnection:
    """POST `body` to `path` and return the connection with its answer unread: many
    of these reach the server within milliseconds, whatever the client machine's speed."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", path, json.dumps(body),
                       {"Content-Type": "application/json"})
    return connection


def answers(connections: list[http.client.HTTPConnection]) -> list[tuple[int, dict, dict]]:
    """(status, headers, JSON body) of each connection's answer, in order."""
    results = []
    for connection in connections:
        response = connection.getresponse()
        results.append((response.status, response.headers,
                        json.loads(response.read())))
        connection.close()
    return results


@pytest.fixture(scope="module")
def live_service(built_bundle, tmp_path_factory):
    """The service on the built bundle, with small input limits to test against."""
    bundle_dir, _ = built_bundle
    with running_service(bundle_dir, tmp_path_factory.mktemp("service"), max_texts=8,
                         max_chars=200, max_body_bytes=4000) as service:
        yield service


@pytest.fixture(autouse=True)
def _restore_tracking_uri():
    """No test tracks into another's database."""
    with restored_tracking_uri():
        yield


# The prediction log's tests run on both databases: one PostgreSQL server per module
# (tests/pg.py), emptied for each test.
@pytest.fixture(scope="module")
def postgres():
    from pg import postgres_server

    with postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def log_url(request, tmp_path):
    """A fresh, empty prediction log on each kind of database."""
    from serving.predlog.store import open_store

    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/log.db"
    server = request.getfixturevalue("postgres")
    store = open_store(server.url)
    with store.connection:
        store.connection.cursor().execute("DELETE FROM feedback; DELETE FROM predictions; "
                                          "DELETE FROM shadow_predictions; "
                                          "DELETE FROM canary_stops")
    store.close()
    return server.url
