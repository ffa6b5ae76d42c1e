"""Several server processes on one port (serving/processes/workers.py): every worker answers,
`/metrics` from any of them describes all, an admin reload reaches all, and a worker
that dies is replaced by one serving what the others serve."""

from __future__ import annotations

import os
import signal
import socket
import time

import httpx
import pytest
from conftest import answers, eventually, running_service, send_without_reading
from test_serving_production import TEXTS, copy_bundle

from serving.monitoring.drift import DriftMonitor
from serving.processes.workers import WorkerGroup

pytestmark = pytest.mark.slow
ADMIN = {"Authorization": "Bearer t"}


def scrape(url: str) -> list[str]:
    return httpx.get(f"{url}/metrics", timeout=10).text.splitlines()


def value(lines: list[str], prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))


def worker_pids(lines: list[str]) -> set[int]:
    return {int(line.split('pid="')[1].split('"')[0]) for line in lines
            if line.startswith("textops_worker_resident_bytes{")}


def replaced(url: str, victim: int) -> bool:
    try:
        pids = worker_pids(scrape(url))
    except httpx.HTTPError:  # the connection landed on the victim's socket as it went
        return False
    return len(pids) == 2 and victim not in pids


def predict_on_new_connections(url: str, count: int, texts=TEXTS) -> list[dict]:
    """`count` requests at once, each on a connection of its own, so the kernel
    spreads them over the workers."""
    results = answers([send_without_reading(url, "/predict", {"texts": texts})
                       for _ in range(count)])
    assert [status for status, _, _ in results] == [200] * count
    return [body for _, _, body in results]


@pytest.fixture(scope="module")
def two_workers(built_bundle, tmp_path_factory):
    with running_service(built_bundle[0], tmp_path_factory.mktemp("workers"), workers=2,
                         admin_token="t", watch_interval_s=0) as service:
        # ready means both workers serve (each reports its memory before loading)
        assert len(worker_pids(scrape(service.url))) == 2
        yield service


def test_metrics_from_any_worker_count_every_worker(two_workers):
    url = two_workers.url
    before = scrape(url)
    requests_before = value(before, 'textops_requests_total{method="POST",route="/predict"')
    window_before = value(before, "textops_drift_window_texts")
    predict_on_new_connections(url, 40)
    # counters are summed over the workers' files at once; each scrape may come from
    # either worker and must show every request
    for _ in range(6):
        after = scrape(url)
        assert value(after, 'textops_requests_total{method="POST",route="/predict"') \
            == requests_before + 40
        assert value(after, "textops_batch_texts_count") > 0
    pids = worker_pids(after)
    assert len(pids) == 2 and os.getpid() not in pids
    assert all(value(after, f'textops_worker_resident_bytes{{pid="{pid}"}}') > 10e6
               for pid in pids)
    # drift windows are merged: every text scored counts once, whoever scored it
    expected = window_before + 40 * len(TEXTS)
    assert eventually(lambda: value(scrape(url), "textops_drift_window_texts") == expected)


def test_admin_reload_reaches_every_worker(two_workers, built_bundle, tmp_path):
    url = two_workers.url
    new = copy_bundle(built_bundle[0], tmp_path / "v-workers", "v-workers")
    answer = httpx.post(f"{url}/admin/reload", json={"bundle": str(new)}, headers=ADMIN,
                        timeout=60)
    assert answer.status_code == 200, answer.text
    workers = answer.json()["workers"]
    assert len(workers) == 2
    assert all(w["model_version"] == "v-workers" and w["followed"] for w in workers)
    versions = {body["model_version"] for body in predict_on_new_connections(url, 24)}
    assert versions == {"v-workers"}
    # /metadata from either worker says what both serve
    listed = httpx.get(f"{url}/metadata", timeout=10).json()["workers"]
    assert sorted(w["pid"] for w in listed) == sorted(w["pid"] for w in workers)
    assert {w["model_version"] for w in listed} == {"v-workers"}
    info = [line for line in scrape(url) if line.startswith("textops_model_info{")]
    assert any('version="v-workers"} 1.0' in line for line in info), info


def test_a_killed_worker_is_replaced_and_serves_the_reloaded_bundle(
        two_workers, built_bundle, tmp_path):
    url = two_workers.url
    new = copy_bundle(built_bundle[0], tmp_path / "v-after-kill", "v-after-kill")
    answer = httpx.post(f"{url}/admin/reload", json={"bundle": str(new)}, headers=ADMIN,
                        timeout=60)
    assert answer.status_code == 200, answer.text
    victim = answer.json()["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    # the supervisor starts a replacement; the dead worker's gauges leave /metrics
    assert eventually(lambda: replaced(url, victim), 60)
    versions = {body["model_version"] for body in predict_on_new_connections(url, 24)}
    assert versions == {"v-after-kill"}


def test_sigterm_drains_every_worker(built_bundle, tmp_path):
    """Requests accepted by either worker are answered before the service exits."""
    texts, requests = [TEXTS[4] * 3] * 64, 32
    with running_service(built_bundle[0], tmp_path, workers=2, max_batch_size=8,
                         max_texts=64, max_queue=4096) as service:
        connections = [send_without_reading(service.url, "/predict", {"texts": texts})
                       for _ in range(requests)]
        time.sleep(0.3)  # let both workers accept their share
        service.process.send_signal(signal.SIGTERM)
        results = answers(connections)
        assert service.process.wait(60) == 0
        log = service.log_tail(40)
    assert [status for status, _, _ in results] == [200] * requests
    assert log.count("Finished server process") >= 2


def test_drift_summaries_of_another_model_are_not_merged():
    """A worker still on the old bundle must not mix its window into the new one's."""
    reference = {"length": {"edges": [2, 4], "shares": [0.3, 0.4, 0.3]}, "unk_rate": 0.0,
                 "class_shares": [0.5, 0.5]}
    others = [{"model": "old", "texts": 50, "lengths": [50, 0, 0], "unknown": 0,
               "tokens": 50, "predicted": [50, 0]},
              {"model": "new", "texts": 2, "lengths": [0, 1, 1], "unknown": 1,
               "tokens": 8, "predicted": [1, 1]}]
    drift = DriftMonitor(100, others=lambda: others)

    class Model:
        version = "new"

    model = Model()
    drift.reset(reference, ["neg", "pos"], model)
    drift.observe(model, [1, 3, 5], [0, 0, 0], [0, 1, 1])
    merged = drift.merged()
    assert merged["texts"] == 5
    assert merged["lengths"] == [1, 2, 2] and merged["predicted"] == [2, 3]
    assert merged["unknown"] == 1 and merged["tokens"] == 17


def test_files_of_dead_workers_are_forgotten(tmp_path):
    """A killed worker cannot clean up: its live gauges, drift window and report go
    at the next scrape, so neither its memory nor its window is counted."""
    dead = 2**22 + 12345  # above pid_max's default: no such process
    for name in (f"gauge_liveall_{dead}.db", f"gauge_livesum_{dead}.db",
                 f"counter_{dead}.db", f"drift-{dead}.json", f"worker-{dead}.json",
                 f"heartbeat-{dead}"):
        (tmp_path / name).write_text("{}")
    WorkerGroup(tmp_path).forget_dead()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"counter_{dead}.db"]


def test_the_service_is_ready_once_every_worker_serves_and_stays_ready(tmp_path):
    """Readiness waits for the last worker to load (else the first requests all land on
    the first), but a replacement loading later does not take the service out."""
    group = WorkerGroup(tmp_path)
    sibling = WorkerGroup(tmp_path, pid=os.getppid())  # alive, like a worker
    group.report("v1", "id")
    sibling.report(None, None)  # still loading
    assert group.starting(2) == (1, [])
    sibling.report(None, None, error="bundle.json: missing")  # says why it cannot serve
    assert group.starting(2) == (1, [f"pid {os.getppid()}: bundle.json: missing"])
    sibling.report("v1", "id")
    assert group.starting(2) == (0, [])
    sibling.leave()  # died; its replacement is loading
    assert group.starting(2) == (0, [])


def test_liveness_answers_within_a_second_under_overload(built_bundle, tmp_path):
    """With every worker's queue full (requests answered 503), the liveness probe still
    answers at once: a probe that timed out would have the pod restarted for load."""
    long_texts = [TEXTS[4] * 3] * 16
    with running_service(built_bundle[0], tmp_path, workers=2, max_queue=32, max_texts=16,
                         max_batch_size=8) as service:
        flood = [send_without_reading(service.url, "/predict", {"texts": long_texts})
                 for _ in range(96)]
        probes = []
        for _ in range(10):
            started = time.monotonic()
            answer = httpx.get(f"{service.url}/health/live", timeout=5)
            probes.append((answer.status_code, time.monotonic() - started))
        results = answers(flood)
    assert 503 in {status for status, _, _ in results}, "the queues never filled"
    assert all(status == 200 and seconds < 1.0 for status, seconds in probes), probes


def test_a_port_in_use_stops_the_service_instead_of_restarting_workers(built_bundle, tmp_path):
    """Workers that can never listen end the service with an error, not a loop."""
    from ops import control

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = control.start(built_bundle[0], port, tmp_path / "service.log",
                                env={"TEXTOPS_WORKERS": "2",
                                     "TEXTOPS_PREDICTION_LOG": ""})
        try:
            code = service.process.wait(60)
        finally:
            control.stop(service.process)
    assert code == 3
    assert f"cannot listen on 127.0.0.1:{port}" in service.log_tail(40)


def test_a_hung_worker_is_killed_and_replaced(built_bundle, tmp_path):
    """A worker whose event loop stops (here: SIGSTOP) stops beating; the supervisor
    kills it after TEXTOPS_WORKER_TIMEOUT_S and starts another."""
    with running_service(built_bundle[0], tmp_path, workers=2, worker_timeout_s=2,
                         prediction_log="") as service:
        assert eventually(lambda: len(worker_pids(scrape(service.url))) == 2, 30)
        victim = min(worker_pids(scrape(service.url)))
        os.kill(victim, signal.SIGSTOP)
        assert eventually(lambda: replaced(service.url, victim), 60)
        predict_on_new_connections(service.url, 16)
        # the whole log: a scrape racing the new worker's start may log a long traceback
        # after the line looked for (prometheus-client reading its half-made file)
        log = service.log_path.read_text(errors="replace")
    assert f"server process {victim} has not answered for 2 s; killing it" in log
