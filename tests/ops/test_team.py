"""A team's setup, for real: one `mlflow server` on PostgreSQL that every run tracks to
and every replica follows, and one DVC remote that a colleague's clone pulls from.

One clone runs the smoke pipeline against the server (module fixture `team`); the tests
then start a replica from `models:/<name>@champion`, promote a second model and watch
the replica switch without a restart, and push the clone's outputs to a DVC remote that
a second clone pulls, after which `dvc repro` has nothing to run.

The server is started with the documentation's own `mlflow server` command (the team
section of docs/deployment.md), so the flags the docs tell a team to use are the ones
tested here."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psycopg2
import pytest
from conftest import ROOT, copy_repo, every_worker_serves, git_init, run, running_service
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


# ---------------------------------------------------------------- the docs' instruction


TEAM_PAGE = ROOT / "docs" / "deployment.md"
TEAM_SECTION = "## A team's tracking server and DVC remote"


def team_commands() -> list[list[str]]:
    """The commands of the docs' team section (its first bash block), each split as the
    shell splits it, comments dropped."""
    page = TEAM_PAGE.read_text()
    assert TEAM_SECTION in page, f"{TEAM_PAGE} has no section {TEAM_SECTION!r}"
    section = page.split(TEAM_SECTION, 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [words for line in lines if (words := shlex.split(line, comments=True))]


def readme_server_options() -> dict[str, str]:
    """The docs' `mlflow server` command for the team, as {--option: value}."""
    (command,) = [words for words in team_commands() if words[:2] == ["mlflow", "server"]]
    options = command[2:]
    assert len(options) % 2 == 0 and all(o.startswith("--") for o in options[::2]), command
    return dict(zip(options[::2], options[1::2], strict=True))


def environment_values(node, name: str):
    """The value of every environment variable `name` set anywhere in a manifest."""
    if isinstance(node, dict):
        if node.get("name") == name and "value" in node:
            yield node["value"]
        for child in node.values():
            yield from environment_values(child, name)
    elif isinstance(node, list):
        for child in node:
            yield from environment_values(child, name)


def client_hosts() -> tuple[set[str], set[str]]:
    """The Host headers the project's own clients send the tracking server: (the docs'
    `export MLFLOW_TRACKING_URI=...` for the team, the MLFLOW_TRACKING_URI of every
    rendered manifest in ops/k8s/ for replicas in a cluster)."""
    team = {words[1].split("=", 1)[1] for words in team_commands()
            if words[0] == "export" and words[1].startswith("MLFLOW_TRACKING_URI=")}
    # as kustomize renders them: the address is set once, in ops/k8s/shared/
    sys.path.insert(0, str(ROOT / "ops" / "k8s"))
    from kustomize import kustomizations, render  # ops/k8s/kustomize.py, run as a script

    replicas = {value for directory in kustomizations() for document in render(directory)
                for value in environment_values(document, "MLFLOW_TRACKING_URI")}
    return {urlsplit(uri).netloc for uri in team}, {urlsplit(uri).netloc for uri in replicas}


# ---------------------------------------------------------------- the team's server


@contextlib.contextmanager
def mlflow_server(database: str, artifacts: Path, log: Path):
    """`mlflow server` as the docs start the team's, but on `database` with a local
    artifact store, on a free loopback port, one worker; always stopped. The docs'
    `--allowed-hosts` is kept, plus this server's own loopback address (which stands in
    for the team's mlflow.internal:5000). SQLAlchemy 2.1 reads a bare postgresql:// as
    psycopg 3: the URI names psycopg2, the driver installed."""
    port = control.free_port()
    options = readme_server_options()
    allowed = options.get("--allowed-hosts")
    options.update({
        "--backend-store-uri": database.replace("postgresql://", "postgresql+psycopg2://", 1),
        "--artifacts-destination": str(artifacts), "--host": "127.0.0.1",
        "--port": str(port), "--workers": "1"})
    if allowed is not None:  # without it MLflow allows loopback and private addresses
        options["--allowed-hosts"] = f"{allowed},127.0.0.1:{port}"
    # MLflow's job runner (a pool of worker processes for server-side jobs) is not
    # needed for tracking and the registry; on 2 shared cores it slows the start.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "wb") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", *itertools.chain(*options.items())],
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


@dataclass
class Server:
    tracking: str         # the MLflow server's URL
    database: str         # its PostgreSQL database
    artifacts: Path       # where it keeps artifacts


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The team's MLflow server on a throw-away PostgreSQL cluster, for the module."""
    base = tmp_path_factory.mktemp("server")
    with postgres_server() as database, \
            mlflow_server(database.url, base / "artifacts", base / "mlflow.log") as tracking:
        yield Server(tracking, database.url, base / "artifacts")


@pytest.fixture(scope="module")
def team(server, tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("team") / "repo")
    run([sys.executable, "-m", "pipeline.config", "experiment=smoke"], repo)
    git_init(repo)
    result = tracked(["dvc", "repro"], repo, server.tracking, timeout=900)
    yield Team(repo, server.tracking, server.database, server.artifacts,
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


def test_the_server_answers_the_names_its_clients_use(server):
    """Started with the docs' `--allowed-hosts`, the server answers every name the
    project's clients reach it by: the docs' MLFLOW_TRACKING_URI for the team, and
    each manifest's for replicas, which reach it by a cluster DNS name. MLflow answers
    403 to a Host it does not allow (while /health still answers 200), so a name the
    docs' list misses, or a manifest pointing at a name it does not list, fails here;
    and a name nobody uses is refused."""
    team_hosts, replica_hosts = client_hosts()
    assert team_hosts and replica_hosts, "no MLFLOW_TRACKING_URI in docs/deployment.md or ops/k8s/"
    api = f"{server.tracking}/api/2.0/mlflow/registered-models/search"
    refused = "mlflow.elsewhere.example:5000"
    for host, status in [*((h, 200) for h in sorted(team_hosts | replica_hosts)),
                         (refused, 403)]:
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
