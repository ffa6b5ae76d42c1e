"""The shadow's worker process (serving/engine/shadow_worker.py) and the `Shadow`
that runs it (serving/engine/shadow.py), without a server: a batch the challenger
fails is counted and the worker goes on; a challenger it cannot load, or a worker that
died, leaves the Shadow dead saying why; STOP ends it after the work queued before;
it ignores Ctrl-C and never outlives its server process; close() leaves no process,
thread or queued data behind, whatever state the worker is in."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT, eventually

from serving.engine import shadow_worker
from serving.engine.following import load_warm
from serving.engine.inference import infer
from serving.engine.shadow import Shadow
from serving.monitoring.metrics import ServiceMetrics
from serving.settings import Settings, SettingsError

PROBS = np.array([[0.9, 0.1]])


@pytest.fixture
def metrics():
    return ServiceMetrics(drift_window=10)


def counted(metrics: ServiceMetrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("textops_shadow_texts_total",
                                             {"outcome": outcome}) or 0


def leftovers() -> tuple[list, list]:
    """The child processes and the shadow's threads (its receiver, a queue's feeder)
    still there."""
    threads = [t.name for t in threading.enumerate()
               if t.name in ("shadow", "QueueFeederThread")]
    return multiprocessing.active_children(), threads


@pytest.fixture
def shadow_of(built_bundle, metrics):
    """shadow_of(path=the built bundle, **Shadow arguments): a Shadow scoring with the
    bundle at `path` (a stand-in for the loaded challenger), closed afterwards."""
    started = []

    def start(path: Path | None = None, capacity: int = 100, max_batch: int = 32,
              settings: Settings | None = None, prediction_log=None,
              digest: str | None = None) -> Shadow:
        path = path or built_bundle[0]
        # the digest of the tokenizer.json loaded with it (serving/bundle/inputs.py)
        digest = digest or (tokenizer_digest(path) if path.exists() else None)
        challenger = SimpleNamespace(path=path, version="challenger-1",
                                     inputs=SimpleNamespace(digest=digest))
        shadow = Shadow(challenger, settings or Settings(), metrics, prediction_log,
                        capacity, max_batch)
        started.append(shadow)
        return shadow

    assert leftovers() == ([], [])
    yield start
    for shadow in started:
        shadow.close(timeout=5)
    assert leftovers() == ([], [])


def tokenizer_digest(bundle: Path) -> str:
    return hashlib.sha256((bundle / "tokenizer.json").read_bytes()).hexdigest()


def ready(shadow: Shadow, metrics: ServiceMetrics) -> None:
    """Wait until the worker has loaded the challenger and scored a request."""
    before = counted(metrics, "scored")
    shadow.offer("ready", ["good film"], PROBS)
    eventually(lambda: counted(metrics, "scored") == before + 1)


def test_a_champions_token_ids_are_scored_as_they_are_only_with_the_same_tokenizer(
        shadow_of, metrics, built_bundle):
    """A text classifier's texts go to the worker as the ids the champion's tokenizer
    made of them when that tokenizer.json is the challenger's (no second tokenizing);
    from a champion with another tokenizer, the texts go and the challenger's own
    tokenizer reads them."""
    logged = {}

    def record(_, requests: list[tuple], answers: np.ndarray) -> None:
        start = 0
        for request_id, items in requests:
            logged[request_id], start = answers[start:start + items], start + items

    shadow = shadow_of(prediction_log=SimpleNamespace(record_shadow=record))
    challenger = load_warm(built_bundle[0], Settings(intra_op_threads=1))
    text, other = "a good film", "a dreadful, boring waste of time"
    ids = challenger.encode([other])  # not the text's: which one was scored shows
    same = SimpleNamespace(inputs=SimpleNamespace(digest=tokenizer_digest(built_bundle[0])))
    another = SimpleNamespace(inputs=SimpleNamespace(digest="another-tokenizer"))
    shadow.offer("same", [text], PROBS, encoded=ids, by=same)
    shadow.offer("another", [text], PROBS, encoded=ids, by=another)
    eventually(lambda: counted(metrics, "scored") == 2)
    of_text, of_other = infer(challenger, [text])[0], infer(challenger, [other])[0]
    assert not np.allclose(of_text, of_other, atol=1e-3)  # the two answers tell apart

    def nearer(answer: np.ndarray, this: np.ndarray, that: np.ndarray) -> bool:
        return np.abs(answer - this).max() < np.abs(answer - that).max()

    assert nearer(logged["same"], of_other, of_text)  # the ids were scored
    assert nearer(logged["another"], of_text, of_other)  # the text was tokenized


def test_a_challenger_whose_tokenizer_changed_on_disk_is_refused(shadow_of, metrics):
    """The worker loads the challenger again in its own process: one whose tokenizer.json
    is no longer what the server process loaded would be fed ids from another
    vocabulary, so it stops, saying why, and scores nothing."""
    shadow = shadow_of(digest="the-tokenizer-the-service-loaded")
    eventually(lambda: shadow.dead)
    assert "tokenizer.json changed" in shadow.dead
    assert counted(metrics, "scored") == 0


def test_a_batch_the_challenger_fails_is_counted_and_the_worker_goes_on(shadow_of, metrics):
    shadow = shadow_of()
    shadow.offer("wrong", [123, None], np.array([[0.5, 0.5], [0.5, 0.5]]))  # not texts
    eventually(lambda: counted(metrics, "failed") == 2)
    ready(shadow, metrics)
    assert shadow.dead is None and shadow.process.is_alive()
    assert counted(metrics, "scored") == 1


def test_the_workers_cpu_time_is_counted_and_its_loading_is_not(shadow_of, metrics):
    def cpu() -> float:
        return metrics.registry.get_sample_value("textops_shadow_cpu_seconds_total")

    shadow = shadow_of(capacity=20 * 16)
    ready(shadow, metrics)
    eventually(lambda: cpu() > 0)
    after_one = cpu()
    for i in range(20):
        shadow.offer(f"r{i}", ["good film"] * 16, PROBS.repeat(16, 0))
    eventually(lambda: counted(metrics, "scored") == 1 + 20 * 16)
    eventually(lambda: cpu() > after_one)
    stat = Path(f"/proc/{shadow.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    whole_life = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    assert cpu() < 0.5 * whole_life  # loading the challenger is most, and not counted


def test_a_cpu_budget_keeps_the_workers_share_of_the_time_within_it(shadow_of, metrics):
    """TEXTOPS_SHADOW_CPU: with work always waiting, the worker rests between batches
    so that its CPU stays within the budget. (Unbounded, it takes what the machine
    leaves idle: most of a core on a quiet one, so without its rests this fails
    there; a busier machine leaves it less.)"""
    def share_while_busy(shadow: Shadow) -> float:
        ready(shadow, metrics)
        scored = counted(metrics, "scored")
        cpu = metrics.registry.get_sample_value("textops_shadow_cpu_seconds_total")
        started = time.monotonic()
        for i in range(12):  # twelve batches' work, queued at once
            shadow.offer(f"r{i}", ["a good film, and a long one"] * 32, PROBS.repeat(32, 0))
        eventually(lambda: counted(metrics, "scored") == scored + 12 * 32, timeout=60)
        took = time.monotonic() - started
        return (metrics.registry.get_sample_value("textops_shadow_cpu_seconds_total")
                - cpu) / took

    budget = 0.02
    capped = share_while_busy(shadow_of(capacity=12 * 32,
                                        settings=Settings(shadow_cpu=budget)))
    assert capped < 1.5 * budget, capped


@pytest.mark.parametrize(("cores", "refused"), [("0", False), ("0.1", False), ("1", False),
                                              ("0.001", True), ("1.5", True)])
def test_a_cpu_budget_is_off_or_one_the_worker_can_live_with(monkeypatch, cores, refused):
    monkeypatch.setenv("TEXTOPS_SHADOW_CPU", cores)
    if refused:  # a sliver would rest for hours after each batch; past 1, one thread
        with pytest.raises(SettingsError, match="SHADOW_CPU"):
            Settings.from_env()
    else:
        assert Settings.from_env().shadow_cpu == float(cores)


def test_a_rest_lasts_what_the_budget_asks_and_ends_when_told_or_orphaned():
    parent = os.getppid()  # this process's parent stands in for a server process
    started = time.monotonic()
    shadow_worker.rest(spent=0.02, took=0.0, share=0.1, parent=parent)  # 0.2 s in all
    assert time.monotonic() - started >= 0.19
    hurry = threading.Event()
    hurry.set()
    for ends_early in ({"hurry": hurry}, {"parent": parent + 1}):
        started = time.monotonic()
        shadow_worker.rest(**{"spent": 5.0, "took": 0.0, "share": 0.1, "parent": parent,
                              **ends_early})  # 50 s, were it not cut short
        assert time.monotonic() - started < 2


def test_closing_a_shadow_within_a_budget_scores_what_waits_without_resting(shadow_of,
                                                                           metrics):
    shadow = shadow_of(capacity=13 * 32, settings=Settings(shadow_cpu=0.01))  # not full
    ready(shadow, metrics)  # it rests now: a hundred times that batch's CPU
    for i in range(12):
        shadow.offer(f"r{i}", ["a good film, and a long one"] * 32, PROBS.repeat(32, 0))
    started = time.monotonic()
    shadow.close(timeout=10)
    assert time.monotonic() - started < 8  # resting through twelve batches: far longer
    assert counted(metrics, "scored") == 1 + 12 * 32 and counted(metrics, "dropped") == 0


def test_a_challenger_that_cannot_be_loaded_leaves_the_shadow_dead_saying_why(
        shadow_of, metrics, tmp_path):
    shadow = shadow_of(tmp_path / "missing")
    eventually(lambda: shadow.dead)
    assert "cannot be loaded" in shadow.dead and "missing" in shadow.dead
    shadow.offer("r1", ["good film", "bad film"], PROBS.repeat(2, 0))
    assert counted(metrics, "dropped") == 2  # counted, and the queue left alone
    assert shadow.requests._thread is None
    assert [counted(metrics, o) for o in ("scored", "failed", "agreed")] == [0, 0, 0]


def test_a_worker_that_was_killed_is_noticed(shadow_of, metrics):
    shadow = shadow_of()
    ready(shadow, metrics)
    shadow.process.kill()
    eventually(lambda: shadow.dead)
    assert f"process {shadow.process.pid} exited (code -9)" in shadow.dead
    shadow.offer("r1", ["good film"], PROBS)
    assert counted(metrics, "dropped") == 1


def test_the_texts_a_dead_worker_had_not_answered_are_counted_as_dropped(shadow_of, metrics):
    shadow = shadow_of()  # batches of 32
    ready(shadow, metrics)
    os.kill(shadow.process.pid, signal.SIGSTOP)
    for i in range(40):  # one batch sent, eight texts in the one being filled
        shadow.offer(f"r{i}", ["good film"], PROBS)
    shadow.process.kill()
    eventually(lambda: shadow.dead)
    assert [counted(metrics, o) for o in ("scored", "dropped")] == [1, 40]


def test_stop_after_queued_work_ends_once_that_is_scored(shadow_of, metrics):
    shadow = shadow_of(max_batch=4)
    for i in range(30):  # queued while the worker still loads, then STOP behind them
        shadow.offer(f"r{i}", ["good film", "bad film"], PROBS.repeat(2, 0))
    shadow.close()
    assert shadow.process.exitcode == 0  # it stopped: it was not killed
    assert counted(metrics, "scored") == 60 and shadow.dead is None


def test_the_worker_ignores_ctrl_c(shadow_of, metrics):
    """It shares the terminal's process group: Ctrl-C is the server's to handle."""
    shadow = shadow_of()
    ready(shadow, metrics)
    os.kill(shadow.process.pid, signal.SIGINT)
    ready(shadow, metrics)
    assert shadow.dead is None and shadow.process.is_alive()


@pytest.mark.parametrize("worker", ["starved", "dead"])
def test_close_leaves_no_process_thread_or_queued_data(shadow_of, metrics, capfd, worker):
    """A worker that takes nothing (starved of CPU, or dead) while the queue is full:
    the feeder thread that is blocked on the full pipe ends too, quietly."""
    shadow = shadow_of(capacity=64)  # two messages of 32 texts
    ready(shadow, metrics)
    os.kill(shadow.process.pid, signal.SIGSTOP)
    text = "good film " * 2000  # 96 requests of 20 kB: far more than a pipe holds
    for i in range(96):
        shadow.offer(f"r{i}", [text], PROBS)
    assert shadow.waiting == 64 and counted(metrics, "dropped") == 32
    if worker == "dead":
        shadow.process.kill()
        eventually(lambda: shadow.dead)
    started = time.monotonic()
    shadow.close(timeout=8)
    assert time.monotonic() - started < 5  # no room for STOP: no wait for the worker
    assert leftovers() == ([], [])
    assert "Traceback" not in capfd.readouterr().err


def test_a_worker_takes_no_batch_for_a_server_process_that_is_gone():
    """Its parent is no longer the server process: it stops before the next batch."""
    queue = multiprocessing.get_context("spawn").Queue()
    try:
        queue.put([("r1", ["good film"], np.array([0]), 1, False)])
        eventually(lambda: not queue.empty())
        assert shadow_worker.take(queue, 8, os.getppid() + 1) is shadow_worker.STOP
        batch = shadow_worker.take(queue, 8, os.getppid())
        assert [(rid, items) for rid, items, *_ in batch] == [("r1", ["good film"])]
    finally:
        queue.close()
        queue.join_thread()


ORPHAN = textwrap.dedent("""
    import multiprocessing, os, sys, time
    import numpy as np
    from serving.engine import shadow_worker
    from serving.settings import Settings

    context = multiprocessing.get_context("spawn")
    requests, results = context.Queue(), context.Queue()
    worker = context.Process(target=shadow_worker.run, daemon=True, args=(
        sys.argv[1], Settings(intra_op_threads=1), requests, results, 64, os.getpid()))
    worker.start()
    for i in range(400):
        requests.put([(f"r{i}", ["good film"] * 64, np.zeros(64, dtype=int), 1)])
    while requests.qsize() > 200:  # its answers to 200 (100 kB) wait, never read
        time.sleep(0.05)
    print(worker.pid, flush=True)
    time.sleep(600)
""")


def gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status  # exited (not reaped by whoever adopted it)


def test_a_worker_whose_server_process_was_killed_exits(built_bundle):
    """Killed, the server process leaves its worker's answers unread in a full pipe:
    the worker exits anyway, without finishing what was queued."""
    server = subprocess.Popen([sys.executable, "-c", ORPHAN, str(built_bundle[0])],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = int(server.stdout.readline())
        server.kill()
        server.wait()
        eventually(lambda: gone(worker), timeout=10)
    finally:
        server.kill()
        server.wait()
        server.stdout.close()
        if worker and not gone(worker):
            os.kill(worker, signal.SIGKILL)
