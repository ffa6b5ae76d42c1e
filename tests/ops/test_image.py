"""The serving image, built and run for real with Docker or Podman (ops/image.py builds
it, ops/container.py runs it).

The image is built once for the module, in both forms: the bundle mounted read-only at
run time (a bundle store with its relative `current` link, as `make deploy` mounts
models/), and the bundle baked in. Each runs as a container on a free loopback port and
must answer as the bundle does offline, as its non-root user, without torch, and stop
cleanly on SIGTERM. Skipped only where no container runtime can start; the sizes and
times measured go to the terminal and to build/image/image-test.json.

Also here, quick and without containers: how `make deploy` chooses between a container
and a local process, and the checks that name a bundle the image's user cannot read.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, compose

from ops import container, control, runtimes
from ops.base_image import base_image
from ops.image import build, image_size
from pipeline.tasks.parity import batch_tolerances
from pipeline.tracking import registry
from serving.bundle import Bundle

TEXTS = ["great superb film", "awful dull boring plot", "the cast, the story"]
RUNTIME_TAG, BAKED_TAG = "textops-serving:test", "textops-serving:test-baked"
REPORT = ROOT / "build" / "image" / "image-test.json"
# What SIGTERM ends the service with. As PID 1 in its container the service exits 0:
# uvicorn drains, then raises the signal again on itself, and the kernel drops a
# default-action signal sent to a namespace's init. Were it not PID 1 (an init in
# front), the re-raised signal would end it with 143 (128 + SIGTERM).
CLEAN_EXITS = (0, 143)

measured: dict = {}


@pytest.fixture(scope="module")
def runtime() -> runtimes.Runtime:
    try:
        return runtimes.find_runtime()
    except runtimes.ContainerError as err:
        pytest.skip(f"no container runtime can start here: {err}")


@pytest.fixture(scope="module")
def images(runtime, built_bundle, tmp_path_factory) -> dict[str, str]:
    """The runtime image and the baked one, built once; their sizes and build times
    are recorded."""
    bundle_dir, _ = built_bundle
    logs = tmp_path_factory.mktemp("image-build")
    started = time.monotonic()
    base = base_image(runtime)
    measured["base_image"] = base
    measured["base_seconds"] = round(time.monotonic() - started, 1)
    for tag, bundle in ((RUNTIME_TAG, None), (BAKED_TAG, bundle_dir)):
        started = time.monotonic()
        build(runtime, logs / f"{tag.split(':')[1]}.log", tag, bundle, base)
        measured[tag] = {"build_seconds": round(time.monotonic() - started, 1),
                         "size_mb": round(image_size(runtime, tag) / 1e6)}
    measured["runtime"] = runtime.name
    yield {"runtime": RUNTIME_TAG, "baked": BAKED_TAG}
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(measured, indent=2) + "\n")


@pytest.fixture(scope="module")
def store(built_bundle, tmp_path_factory) -> Path:
    """A models/ directory as the registry leaves it: bundles/1 and a `current` link
    relative to models/, readable by others, as `make deploy` mounts it."""
    bundle_dir, _ = built_bundle
    models = tmp_path_factory.mktemp("store") / "models"
    models.mkdir(mode=0o755)
    models.chmod(0o755)  # whatever the umask: the image's user lists it
    record = {"model_name": "synthetic-classifier", "registry_version": "1",
              "mlflow_run_id": "run-1", "git_commit": "abc"}
    registry.point_current(registry.store_bundle(bundle_dir, record, models / "bundles"),
                           models / "current")
    return models


@dataclass
class Container:
    name: str
    url: str
    process: subprocess.Popen  # the runtime's `run` client, attached: it exits with it
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def running(runtime, image: str, tmp_path: Path, bundle: Path | None = None,
            state_dir: Path | None = None):
    """The image as a container on a free loopback port, ready; always removed."""
    port = control.free_port()
    name = f"textops-test-{port}"
    log_path = tmp_path / f"{name}.log"
    command = runtime.command(*container.run_args(runtime, image, name, port, bundle=bundle,
                                                  state_dir=state_dir))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    started = Container(name, f"http://127.0.0.1:{port}", process, log_path)
    try:
        began = time.monotonic()
        try:
            control.wait_ready(started.url, 120, process)
        except RuntimeError as err:
            raise AssertionError(f"{err}\n{started.log()[-3000:]}") from None
        measured.setdefault("ready_seconds", {})[image] = round(time.monotonic() - began, 1)
        yield started
    finally:
        container.stop(runtime, name, timeout=10)
        if process.poll() is None:
            process.kill()
            process.wait()


def logged_predictions(database: Path, timeout: float = 10) -> int:
    """Rows in the service's prediction log, read-only (written off the request path,
    so they are waited for)."""
    deadline, rows = time.monotonic() + timeout, 0
    while not rows and time.monotonic() < deadline:
        time.sleep(0.2)
        with contextlib.suppress(sqlite3.Error), contextlib.closing(
                sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
            rows = connection.execute("SELECT count(*) FROM predictions").fetchone()[0]
    return rows


def in_container(runtime, name: str, *command: str) -> str:
    return runtime.run("exec", name, *command).stdout.strip()


def assert_answers_like_the_bundle(url: str, bundle_dir: Path, version: str) -> None:
    status, ready = control.http_json("GET", f"{url}/health/ready")
    assert status == 200 and ready["model_version"] == version, ready
    status, body = control.http_json("POST", f"{url}/predict", {"texts": TEXTS}, timeout=30)
    assert status == 200, body
    offline = Bundle.load(bundle_dir, "int8").predict_proba(TEXTS)
    served = np.array([[p["probabilities"][label] for label in ("neg", "pos")]
                       for p in body["predictions"]])
    # the service may batch these texts otherwise than predict_proba does
    assert np.abs(served - offline).max() <= batch_tolerances(compose())["int8"]
    assert [p["label"] for p in body["predictions"]] == [
        ["neg", "pos"][i] for i in offline.argmax(1)]


def assert_stops_on_sigterm(runtime, image: str, started: Container) -> None:
    began = time.monotonic()
    runtime.run("kill", "--signal", "TERM", started.name)
    code = started.process.wait(60)
    measured.setdefault("sigterm", {})[image] = {
        "exit_code": code, "seconds": round(time.monotonic() - began, 1)}
    assert code in CLEAN_EXITS, started.log()[-3000:]
    log = started.log()
    assert "Shutting down" in log and "Finished server process" in log, log[-3000:]


@pytest.mark.slow
def test_mounted_bundle_serves_as_offline_as_non_root_without_torch(
        runtime, images, store, built_bundle, tmp_path):
    bundle_dir, meta = built_bundle
    run_dir = tmp_path / "run"  # as `make deploy` mounts its run directory
    run_dir.mkdir()
    with running(runtime, images["runtime"], tmp_path, bundle=store / "current",
                 state_dir=run_dir) as started:
        assert_answers_like_the_bundle(started.url, bundle_dir, meta["version"])
        # the service's prediction log is the host's run/predictions.db, where a local
        # process would keep it and `make retrain` reads it
        assert logged_predictions(run_dir / "predictions.db") == len(TEXTS)
        # served through the link: the store's registry record comes with it
        _, metadata = control.http_json("GET", f"{started.url}/metadata")
        assert metadata["registry"]["registry_version"] == "1"
        # the serving process (PID 1) and a command run inside: the image's user
        owner = in_container(runtime, started.name, "sh", "-c", "grep ^Uid: /proc/1/status")
        assert owner.split()[1:] == ["10001"] * 4, owner
        assert in_container(runtime, started.name, "id", "-u") == "10001"
        missing = in_container(runtime, started.name, "python", "-c",
                               "import importlib.util as u; "
                               "print([m for m in ('torch', 'pipeline') if u.find_spec(m)])")
        assert missing == "[]", f"in the serving image: {missing}"
        # mounted read-only: nothing in the container can change the store
        mount = in_container(runtime, started.name, "grep", " /models ", "/proc/mounts")
        assert mount.split()[3].split(",")[0] == "ro", mount
        assert_stops_on_sigterm(runtime, images["runtime"], started)


@pytest.mark.slow
def test_baked_bundle_serves_with_nothing_mounted(runtime, images, built_bundle, tmp_path,
                                                  capsys):
    bundle_dir, meta = built_bundle
    with running(runtime, images["baked"], tmp_path) as started:
        assert_answers_like_the_bundle(started.url, bundle_dir, meta["version"])
        assert in_container(runtime, started.name, "sh", "-c",
                            "echo $TEXTOPS_BUNDLE; stat -c %U:%a /models/baked/bundle.json"
                            ).split() == ["/models/baked", "root:644"]
        assert_stops_on_sigterm(runtime, images["baked"], started)
    with capsys.disabled():
        print(f"\nserving image ({runtime.name}, base {measured['base_image']}): "
              f"{measured[RUNTIME_TAG]['size_mb']} MB; with the bundle baked in "
              f"{measured[BAKED_TAG]['size_mb']} MB; figures in {REPORT}")


# ---------------------------------------------------------------- quick, no containers


@pytest.fixture
def deployed():
    """Run directories of `control.up`, each stopped afterwards."""
    run_dirs = []
    yield run_dirs
    for run_dir in run_dirs:
        control.down(run_dir)


def failing_build(*args, **kwargs):
    raise runtimes.ContainerError("`podman build` failed (1), log run/image-build.log:\n"
                                   "no space left on device")


def no_runtime(choice):
    raise runtimes.ContainerError("no container runtime works (docker: not installed; "
                                   "podman: not installed)")


@pytest.mark.parametrize("breakage, said", [
    ("no runtime", "serving as a local process: no container runtime works"),
    ("build fails", "the podman container failed, so a local process serves instead: "
                    "`podman build` failed"),
], ids=["no runtime", "build fails"])
def test_deploy_falls_back_to_a_local_process_saying_why(breakage, said, built_bundle,
                                                         deployed, monkeypatch, capsys,
                                                         tmp_path):
    """`make deploy` on a machine without a working container runtime, or where the
    image does not build, still serves: a local process, and one line says why."""
    bundle_dir, meta = built_bundle
    if breakage == "no runtime":
        monkeypatch.setattr(runtimes, "find_runtime", no_runtime)
    else:
        monkeypatch.setattr(runtimes, "find_runtime", lambda choice: runtimes.Runtime("podman"))
        monkeypatch.setattr("ops.image.build", failing_build)
    run_dir = tmp_path / "run"
    deployed.append(run_dir)
    url, log = control.up(bundle_dir, control.free_port(), run_dir, "127.0.0.1", 60)
    assert said in capsys.readouterr().out
    assert log == str(run_dir / "service.log") and control.running_pid(run_dir)
    _, ready = control.http_json("GET", f"{url}/health/ready")
    assert ready["model_version"] == meta["version"]
    assert "stopped service" in control.down(run_dir)


def test_a_runtime_asked_for_by_name_must_work(built_bundle, monkeypatch, tmp_path):
    """DEPLOY_RUNTIME=podman on a machine where podman cannot run: an error, not a
    silent local process."""
    bundle_dir, _ = built_bundle
    monkeypatch.setattr(runtimes, "why_not", lambda name: f"{name}: `{name} info` failed")
    with pytest.raises(RuntimeError, match="podman: `podman info` failed"):
        control.up(bundle_dir, control.free_port(), tmp_path / "run", "127.0.0.1", 10,
                   runtime_choice="podman")
    assert not (tmp_path / "run" / "service.pid").exists()


def test_the_mount_keeps_current_resolvable_and_names_unreadable_files(built_bundle,
                                                                        tmp_path):
    bundle_dir, _ = built_bundle
    models = tmp_path / "models"
    target = registry.store_bundle(bundle_dir, {"registry_version": "3"}, models / "bundles")
    registry.point_current(target, models / "current")
    # a relative link inside models/: models/ is mounted and the link followed there
    assert container.bundle_mount(models / "current") == (
        models.resolve(), "/models", "/models/current")
    # an absolute link would point nowhere inside the container: the bundle alone
    (models / "elsewhere").symlink_to(target.resolve())
    assert container.bundle_mount(models / "elsewhere") == (
        target.resolve(), "/models/bundle", "/models/bundle")
    models.chmod(0o755)
    container.check_mountable(models / "current")
    (target / "bundle.json").chmod(0o600)  # as bundles were written before 0644
    with pytest.raises(runtimes.ContainerError,
                       match=r"cannot read .*bundles/3/bundle.json \(mode 600\)"):
        container.check_mountable(models / "current")
    os.chmod(target / "bundle.json", 0o644)
