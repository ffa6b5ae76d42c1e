"""Canary mode through real HTTP: the challenger answers a share of the clients, the
same client always the same model, and each answer says which model gave it, in the
response and in the log."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from types import SimpleNamespace

import httpx
import pytest
from conftest import ROOT, running_service

from serving.engine.canary import Canary, Guard, takes


@pytest.fixture(scope="module")
def challenger(built_bundle, tmp_path_factory):
    bundle_dir, meta = built_bundle
    copy = shutil.copytree(bundle_dir, tmp_path_factory.mktemp("canary") / "bundle")
    (copy / "bundle.json").write_text(json.dumps({**meta, "version": "challenger-1"}))
    return copy


def test_routing_by_key_is_sticky_and_close_to_the_share():
    keys = [f"user-{i}" for i in range(4000)]
    share = sum(takes(k, 0.1) for k in keys) / len(keys)
    assert 0.08 < share < 0.12
    # the same keys go the same way in another process (another PYTHONHASHSEED): a
    # client stays with its model across the service's workers and restarts
    elsewhere = subprocess.run(
        [sys.executable, "-c", "from serving.engine.canary import takes; "
         "print(''.join(str(int(takes(f'user-{i}', 0.1))) for i in range(4000)))"],
        capture_output=True, text=True, check=True, cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.strip()
    assert elsewhere == "".join(str(int(takes(k, 0.1))) for k in keys)


def test_the_challenger_answers_its_share_of_clients_and_says_so(built_bundle, challenger,
                                                                  tmp_path):
    bundle_dir, meta = built_bundle
    with running_service(bundle_dir, tmp_path, challenger=challenger,
                         challenger_mode="canary", canary_share=0.5) as service:
        metadata = httpx.get(f"{service.url}/metadata", timeout=10).json()
        assert metadata["challenger"] == {"version": "challenger-1", "mode": "canary",
                                          "registry": None}
        seen: dict[str, set] = {}
        for user in range(30):
            for _ in range(3):
                answer = httpx.post(f"{service.url}/predict", json={"texts": ["good film"]},
                                    headers={"X-Client-Key": f"user-{user}"}, timeout=30)
                assert answer.status_code == 200
                body = answer.json()
                role = "challenger" if body["model_version"] == "challenger-1" else "champion"
                assert body["role"] == role
                assert takes(f"user-{user}", 0.5) == (role == "challenger")
                seen.setdefault(f"user-{user}", set()).add(body["model_version"])
                last = body["request_id"], body["model_version"]
        assert all(len(versions) == 1 for versions in seen.values())  # sticky
        assert {v for versions in seen.values() for v in versions} == {
            meta["version"], "challenger-1"}
        assert httpx.post(f"{service.url}/feedback", json={
            "request_id": last[0], "label": meta["label_names"][0]},
            timeout=30).status_code == 200  # the log has caught up
    with sqlite3.connect(tmp_path / "predictions.db") as db:
        logged = dict(db.execute("SELECT request_id, model_version FROM predictions"))
    assert logged[last[0]] == last[1]
    assert set(logged.values()) == {meta["version"], "challenger-1"}


class Answers:
    """A batcher stand-in that answers with its name, or fails; its answers take
    `delay` seconds on `clock` (a stand-in for time.perf_counter), not on the machine's."""

    def __init__(self, name: str, fails: bool = False, delay: float = 0.0, clock=None):
        self.name, self.fails, self.delay, self.clock = name, fails, delay, clock

    async def submit(self, texts):
        if self.clock is not None:
            self.clock.now += self.delay
        if self.fails:
            raise RuntimeError("the challenger's model failed")
        return self.name, texts

    def close(self):
        pass


def test_a_challenger_that_fails_is_answered_for_and_then_stopped(monkeypatch):
    import asyncio

    from serving.engine.service import InferenceService
    from serving.settings import Settings

    service = InferenceService(Settings(prediction_log="", canary_max_failures=2))
    service.bundle, service.batcher = object(), Answers("champion")
    canary = Canary.__new__(Canary)
    canary.challenger, canary.share = SimpleNamespace(version="c-1"), 0.999
    canary.guard = Guard(window=200, max_failures=2, max_p99_ratio=2.0)
    canary.batcher = Answers("challenger", fails=True)
    service.canary = canary
    monkeypatch.setattr("serving.engine.challenger.takes", lambda key, share: True)
    for _ in range(2):  # every failed request is answered by the champion
        assert asyncio.run(service.predict(["a text"], "user")) == ("champion", ["a text"])
    assert service.canary is None and "failed 2 requests" in service.shadow_error
    failed = service.metrics.shadow.labels("failed")._value.get()
    assert failed == 2


def test_a_challenger_much_slower_than_the_champion_is_stopped(monkeypatch):
    """The latency guard: over the latest requests each answered, a challenger whose
    p99 is over twice the champion's stops the canary; one within it runs on."""
    import asyncio

    from serving.engine.service import InferenceService
    from serving.settings import Settings

    monkeypatch.setattr("serving.engine.challenger.takes", lambda key, share: key == "canary")
    clock = SimpleNamespace(now=0.0)  # latencies as the stand-ins say, on any machine
    monkeypatch.setattr("time.perf_counter", lambda: clock.now)

    def run(challenger_delay: float) -> InferenceService:
        service = InferenceService(Settings(prediction_log="", canary_window=40))
        service.bundle = object()
        service.batcher = Answers("champion", delay=0.02, clock=clock)
        canary = Canary.__new__(Canary)
        canary.challenger, canary.share = SimpleNamespace(version="c-1"), 0.5
        canary.guard = Guard(window=40, max_failures=5, max_p99_ratio=2.0)
        canary.batcher = Answers("challenger", delay=challenger_delay, clock=clock)
        service.canary = canary

        async def traffic():
            for _ in range(30):
                for key in ("canary", "user"):
                    await service.predict(["a text"], key)

        asyncio.run(traffic())
        return service

    slow = run(challenger_delay=0.1)
    assert slow.canary is None and "p99" in slow.shadow_error
    assert "the champion's" in slow.shadow_error and "c-1" in slow.shadow_error
    alike = run(challenger_delay=0.02)
    assert alike.canary is not None and alike.shadow_error is None
    # the bound is max_p99_ratio (2.0) itself: just over it stops, just under runs on
    assert run(challenger_delay=0.05).canary is None  # 2.5x
    assert run(challenger_delay=0.03).canary is not None  # 1.5x


def test_a_stop_in_one_server_process_stops_the_canary_in_every_other(monkeypatch, tmp_path):
    """Two server processes (workers, or replicas) sharing a log: the one whose guards
    trip records the stop, the other stops its canary on its next watch tick, and one
    that starts later does not start that challenger's canary."""
    import asyncio

    from serving.engine.service import InferenceService
    from serving.predlog.canary_stops import CanaryStops
    from serving.predlog.store import open_store
    from serving.settings import Settings

    monkeypatch.setattr("serving.engine.challenger.takes", lambda key, share: True)
    log = f"sqlite:///{tmp_path}/predictions.db"
    open_store(log).close()  # the log as a server's writer creates it

    def server(fails: bool, version: str = "c-1") -> InferenceService:
        service = InferenceService(Settings(prediction_log=log, canary_max_failures=2))
        service.bundle, service.batcher = SimpleNamespace(version="champ-1"), Answers("champion")
        canary = Canary.__new__(Canary)
        canary.challenger, canary.share = SimpleNamespace(version=version), 0.5
        canary.guard = Guard(window=200, max_failures=2, max_p99_ratio=2.0)
        canary.batcher = Answers("challenger", fails=fails)
        service.canary = canary
        return service

    tripping, other = server(fails=True), server(fails=False)
    another_challenger = server(fails=False, version="c-2")

    async def traffic():
        for service in (tripping, other):
            await service.predict(["a text"], "user")
        assert await other.refresh_challenger() is None and other.canary is not None
        await tripping.predict(["a text"], "user")  # its second failure: the guard trips
        await tripping.stop_recorded
        for service in (other, another_challenger):  # a watch tick
            await service.refresh_challenger()

    asyncio.run(traffic())
    assert tripping.canary is None and "failed 2 requests" in tripping.shadow_error
    assert other.canary is None
    assert other.shadow_error == ("canary stopped: the challenger c-1 failed 2 requests (of "
                                  "its latest 2) (seen by another server process); every "
                                  "request goes to the champion")
    assert another_challenger.canary is not None  # another challenger runs on
    stops = CanaryStops(log)
    assert stops.reason("c-1") == "failed 2 requests (of its latest 2)"
    assert stops.reason("c-2") is None
    stops.close()

    # a process starting later loads the challenger, finds the stop and serves alone
    later = InferenceService(Settings(prediction_log=log, challenger_mode="canary"))
    later.bundle = SimpleNamespace(version="champ-2")  # beside another champion too
    monkeypatch.setattr("serving.engine.challenger.load_challenger",
                        lambda *args: SimpleNamespace(version="c-1"))
    asyncio.run(later.start_challenger())
    assert later.canary is None
    assert later.shadow_error == ("canary stopped: the challenger c-1 failed 2 requests (of "
                                  "its latest 2) (recorded in the prediction log)")

    # a person clears the stop (`textops clear-stop`): on the next tick the canary runs
    monkeypatch.setattr("serving.engine.challenger.Canary",
                        lambda challenger, *args: SimpleNamespace(challenger=challenger))
    asyncio.run(later.refresh_challenger())
    assert later.canary is None  # not cleared yet
    store = open_store(log)
    store.clear_canary_stop("c-1")
    store.close()
    asyncio.run(later.refresh_challenger())
    assert later.canary is not None and later.shadow_error is None
    for service in (tripping, other, another_challenger, later):  # never started: no writer
        service.canary_stops.close()


def test_a_challenger_that_was_retired_and_challenges_again_is_started(monkeypatch,
                                                                       tmp_path):
    """The controller rolled a stopped canary back (its alias gone), a person cleared
    the stop and made the same version the challenger again: a running service starts
    its canary on the next tick."""
    import asyncio

    from serving.engine.service import InferenceService
    from serving.predlog.canary_stops import CanaryStops
    from serving.predlog.store import open_store
    from serving.settings import Settings

    log = f"sqlite:///{tmp_path}/predictions.db"
    open_store(log).close()
    gone = type("Gone", (Exception,), {"error_code": "RESOURCE_DOES_NOT_EXIST"})
    alias = {"to": "model/4"}

    def identity(source):
        if alias["to"] is None:
            raise gone("no alias challenger")
        return alias["to"]

    monkeypatch.setattr("serving.engine.challenger.BundleSource.identity", identity)
    monkeypatch.setattr("serving.engine.challenger.load_challenger",
                        lambda *args: SimpleNamespace(version="c-4"))
    monkeypatch.setattr("serving.engine.challenger.Canary",
                        lambda challenger, *args: SimpleNamespace(challenger=challenger,
                                                                  version="c-4"))
    service = InferenceService(Settings(prediction_log=log, challenger_mode="canary",
                                        challenger="models:/model@challenger"))
    service.bundle = SimpleNamespace(version="champ-1")
    stops = CanaryStops(log)
    stops.record("c-4", "champ-1", "failed 5 requests (of its latest 9)")

    async def ticks():
        await service.refresh_challenger()
        assert service.canary is None and "failed 5 requests" in service.shadow_error
        alias["to"] = None  # `textops decide` rolled it back
        await service.refresh_challenger()
        stops._run(lambda store: store.clear_canary_stop("c-4"))  # `textops clear-stop 4`
        await service.refresh_challenger()
        assert service.canary is None  # cleared, but nobody challenges
        alias["to"] = "model/4"  # `textops challenge 4`
        await service.refresh_challenger()

    asyncio.run(ticks())
    assert service.canary is not None and service.shadow_error is None
    stops.close()
    service.canary_stops.close()


def test_a_stop_the_log_cannot_take_now_is_written_later(tmp_path, caplog):
    """A database outage delays a stop, never loses it; a log no server of this
    version created yet holds no stop."""
    from serving.predlog.canary_stops import CanaryStops
    from serving.predlog.store import open_store

    log = f"sqlite:///{tmp_path}/predictions.db"
    stops = CanaryStops(log)
    assert stops.reason("c-1") is None  # no log yet: nothing to stop
    (tmp_path / "predictions.db").mkdir()  # the database cannot be opened
    stops.record("c-1", "champ-1", "failed 5 requests")
    assert stops.pending and "cannot be read or written" in caplog.text
    with pytest.raises(Exception):  # noqa: B017 - whatever sqlite3 raises for it
        stops.reason("c-1")
    assert caplog.text.count("cannot be read or written") == 1  # once per outage
    (tmp_path / "predictions.db").rmdir()
    open_store(log).close()  # the writer creates the log
    assert stops.reason("c-1") == "failed 5 requests" and not stops.pending
    assert "work again" in caplog.text
    stops.close()


def test_a_connection_the_database_dropped_is_replaced_by_the_next_tick(tmp_path, caplog):
    """A broken connection fails the tick that finds it (logged once), and the next
    tick reads the stops through a new one."""
    from serving.predlog.canary_stops import CanaryStops
    from serving.predlog.store import open_store

    log = f"sqlite:///{tmp_path}/predictions.db"
    open_store(log).close()
    stops = CanaryStops(log)
    stops.record("c-1", "champ-1", "failed 5 requests")
    stops.connection.store.connection.close()  # what a restarted database leaves
    with pytest.raises(sqlite3.ProgrammingError):
        stops.reason("c-1")
    assert caplog.text.count("cannot be read or written") == 1
    assert stops.reason("c-1") == "failed 5 requests"
    assert "work again" in caplog.text
    stops.close()
