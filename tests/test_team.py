"""A team's setup, for real: one `mlflow server` on PostgreSQL that every run tracks to
and every replica follows, and one DVC remote that a colleague's clone pulls from.

One clone runs the smoke pipeline against the server (module fixture `team`); the tests
then start a replica from `models:/<name>@champion`, promote a second model and watch
the replica switch without a restart, and push the clone's outputs to a DVC remote that
a second clone pulls, after which `dvc repro` has nothing to run."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg2
import pytest
from conftest import copy_repo, every_worker_serves, git_init, run, running_service
from pg import postgres_server

from ops import control

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
GIT_USER = ["-c", "user.email=team@textops", "-c", "user.name=team"]


@dataclass
class Team:
    repo: Path            # the clone that ran the pipeline
    tracking: str         # the MLflow server's URL
    database: str         # its PostgreSQL database
    artifacts: Path       # where the server keeps artifacts
    log: str              # the first `dvc repro`'s output


def tracked(cmd: list[str], repo: Path, tracking: str, timeout: float = 600):
    """Run `cmd` in `repo` as a team member does: MLFLOW_TRACKING_URI set to the server
    (conftest.run clears it, so this is the one place that sets it)."""
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": tracking}
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n"
                                    f"{result.stderr[-6000:]}")
    return result


# The name replicas in a cluster reach the server by (ops/k8s/overlays/champion).
CLUSTER_HOST = "mlflow.mlops.svc.cluster.local:5000"


@contextlib.contextmanager
def mlflow_server(database: str, artifacts: Path, log: Path):
    """`mlflow server` on `database` with a local artifact store, on a free loopback
    port, as the README starts the team's; always stopped. SQLAlchemy 2.1 reads a bare
    postgresql:// as psycopg 3: the URI names psycopg2, the driver installed. MLflow
    answers only Host headers it allows (loopback and private addresses by default)."""
    backend = database.replace("postgresql://", "postgresql+psycopg2://", 1)
    port = control.free_port()
    # MLflow's job runner (a pool of worker processes for server-side jobs) is not
    # needed for tracking and the registry; on 2 shared cores it slows the start.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "wb") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
             "--artifacts-destination", str(artifacts), "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1",
             "--allowed-hosts", f"127.0.0.1:{port},{CLUSTER_HOST}"],
            cwd=log.parent, env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            control.wait_until(f"{url}/health", 120, server)
        except RuntimeError as err:
            raise AssertionError(f"{err}\n{log.read_text()[-3000:]}") from None
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    base = tmp_path_factory.mktemp("team")
    with postgres_server() as database, \
            mlflow_server(database.url, base / "artifacts", base / "mlflow.log") as tracking:
        repo = copy_repo(base / "repo")
        run([sys.executable, "-m", "pipeline.config", "experiment=smoke"], repo)
        git_init(repo)
        result = tracked(["dvc", "repro"], repo, tracking, timeout=900)
        yield Team(repo, tracking, database.url, base / "artifacts",
                   result.stdout + result.stderr)


def model_name(repo: Path) -> str:
    return json.loads((repo / "reports/deploy.json").read_text())["model_name"]


def candidate_version(repo: Path) -> str:
    return json.loads((repo / "models/candidate/bundle.json").read_text())["version"]


# ---------------------------------------------------------------- the tracking server


def test_the_pipeline_tracks_and_registers_on_the_team_server(team):
    import mlflow

    assert "Running stage 'deploy'" in team.log
    client = mlflow.MlflowClient(team.tracking)
    name = model_name(team.repo)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "1" and champion.tags["bundle_version"] == \
        candidate_version(team.repo)
    run = client.get_run(champion.run_id)
    assert "test_accuracy" in run.data.metrics and "val_f1" in run.data.metrics
    # nothing went to the default local store; runs and models are rows in PostgreSQL,
    # their files in the server's artifact store
    assert not (team.repo / "mlflow.db").exists()
    with psycopg2.connect(team.database) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT name FROM registered_models")
        assert cursor.fetchall() == [(name,)]
        cursor.execute("SELECT count(*) FROM runs WHERE run_uuid = %s", (champion.run_id,))
        assert cursor.fetchone() == (1,)
    stored = {p.name for p in team.artifacts.rglob("*") if p.is_file()}
    assert {"model.onnx", "model.int8.onnx", "tokenizer.json", "bundle.json"} <= stored


def test_the_server_answers_the_names_it_allows(team):
    """Replicas reach the server by a cluster DNS name, which MLflow refuses (403, while
    /health still answers 200) unless `--allowed-hosts` names it."""
    api = f"{team.tracking}/api/2.0/mlflow/registered-models/search"
    for host, status in ((CLUSTER_HOST, 200), ("mlflow.elsewhere.example:5000", 403)):
        assert httpx.get(api, headers={"Host": host}, timeout=10).status_code == status, host


def register_another_champion(team: Team, tmp_path: Path) -> tuple[str, str]:
    """Promote a second registered version through the server, as the deploy stage
    does for a blessed model: the same model under another bundle version, registered
    in the first run, then given the alias. Returns (registry version, bundle version)."""
    import mlflow
    from conftest import restored_tracking_uri

    from pipeline.tracking import registry

    name = model_name(team.repo)
    bundle = shutil.copytree(team.repo / "models/candidate", tmp_path / "second")
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["version"] = "second-" + meta["version"][:8]
    (bundle / "bundle.json").write_text(json.dumps(meta))
    with restored_tracking_uri():
        mlflow.set_tracking_uri(team.tracking)
        client = mlflow.MlflowClient()
        run_id = client.get_model_version_by_alias(name, registry.CHAMPION).run_id
        version = registry.register(bundle, meta, run_id)
        client.set_registered_model_alias(name, registry.CHAMPION, version)
    return version, meta["version"]


def serves(replica, identity: str, bundle_version: str) -> None:
    """Wait until the replica serves that registry version, then check what it says."""
    every_worker_serves(replica.url, identity=identity)
    metadata = httpx.get(f"{replica.url}/metadata", timeout=10).json()
    assert metadata["version"] == bundle_version
    answer = httpx.post(f"{replica.url}/predict", json={"texts": ["a fine film"]},
                        timeout=10).json()
    assert answer["model_version"] == bundle_version


def prediction_log_database(team: Team) -> str:
    """A database of its own for the replicas' prediction log, beside MLflow's."""
    with contextlib.closing(psycopg2.connect(team.database)) as connection:
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE predictions")
    return team.database.rsplit("/", 1)[0] + "/predictions"


def logged_predictions(database: str) -> int:
    with psycopg2.connect(database) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM predictions")
        return cursor.fetchone()[0]


def test_a_promotion_and_a_rollback_reach_the_running_replica(team, tmp_path, monkeypatch):
    """A replica configured as ops/k8s/overlays/champion configures one (the champion from
    the server, the prediction log in PostgreSQL) serves v1; a second version promoted
    on the server, then `make rollback` run by a team member, each reach the same
    replica process within seconds."""
    name, first = model_name(team.repo), candidate_version(team.repo)
    log_database = prediction_log_database(team)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.tracking)  # the replica's environment
    with running_service(f"models:/{name}@champion", tmp_path, watch_interval_s=0.5,
                         cache_dir=tmp_path / "cache", prediction_log=log_database) as replica:
        serves(replica, f"{name}/1", first)
        assert httpx.get(f"{replica.url}/v2/health/ready", timeout=10).status_code == 200

        version, second = register_another_champion(team, tmp_path)
        assert version == "2"
        serves(replica, f"{name}/2", second)

        make = ["make", "-o", f"{VENV_BIN.parent}/.installed", f"VENV={VENV_BIN.parent}"]
        log = tracked([*make, "rollback"], team.repo, team.tracking).stdout
        assert f"{name} champion is now v1" in log
        serves(replica, f"{name}/1", first)
        assert replica.process.poll() is None  # the same process all along: no restart
    # the writer batches rows off the request path and flushes them as the service stops
    assert logged_predictions(log_database) == 3  # one /predict per serves()


# ---------------------------------------------------------------- the DVC remote


def digest(path: Path) -> str:
    """One hash over a file or a directory's files (names and bytes)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    hasher = hashlib.sha256()
    for file in files:
        hasher.update(str(file.relative_to(path.parent)).encode())
        hasher.update(file.read_bytes())
    return hasher.hexdigest()


def test_a_colleague_pulls_from_the_dvc_remote_and_reruns_nothing(team, tmp_path):
    repo, remote = team.repo, tmp_path / "dvc-remote"
    # the member who ran the pipeline commits it, adds the team's remote and pushes
    run(["git", *GIT_USER, "add", "-A"], repo)
    run(["git", *GIT_USER, "commit", "-qm", "a run of the smoke experiment"], repo)
    run(["dvc", "remote", "add", "-d", "storage", str(remote)], repo)
    run(["git", *GIT_USER, "commit", "-qm", "the team's DVC remote", ".dvc/config"], repo)
    run(["dvc", "push"], repo)

    # a colleague clones, pulls, and finds the pipeline up to date
    clone = tmp_path / "colleague"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    status = run(["dvc", "status"], clone).stdout
    assert "Data and pipelines are up to date" in status, status
    repro = run(["dvc", "repro"], clone).stdout
    assert "Running stage" not in repro, repro
    outputs = ["data/raw", "data/processed", "models/checkpoints", "models/candidate",
               "reports/metrics.json", "reports/gate.json", "reports/deploy.json"]
    for output in outputs:
        assert digest(clone / output) == digest(repo / output), output
    assert run(["git", "status", "--porcelain"], clone).stdout == ""  # dvc.lock unchanged
