"""The prediction log and feedback: the store on SQLite and PostgreSQL, the writer's
queue, sampling and retention, request ids and POST /feedback over real HTTP, live
accuracy in /metrics, and the log's faults (requests never fail because of it)."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pg import postgres_server
from tokenizers import normalizers

from serving.metrics import ServiceMetrics
from serving.prediction_log import (
    LiveStats,
    PredictionLog,
    PredictionLogError,
    open_store,
    prediction_rows,
    read_labelled,
    sampled,
)

NAMES = ["neg", "pos"]
TEXTS = ["great superb film", "awful dull boring plot", "the cast, the story",
         "lovely", "bad", "fine movie"]


def fake_bundle(version: str = "v1"):
    """What the writer reads from a bundle: a real (lower-casing) normalizer, the
    label names and the version."""
    return SimpleNamespace(tokenizer=SimpleNamespace(normalizer=normalizers.Lowercase()),
                           label_names=NAMES, version=version)


def rows_for(request_id: str, created: float, labels: list[str], version: str = "v1"):
    """predictions rows of one request whose texts got `labels`."""
    probs = np.array([[0.9, 0.1] if label == "neg" else [0.2, 0.8] for label in labels],
                     dtype=np.float32)
    texts = [f"Text {request_id} {i}" for i in range(len(labels))]
    return prediction_rows(request_id, created, fake_bundle(version), texts, probs)


def counter(metrics: ServiceMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


@contextlib.contextmanager
def throwaway_postgres():
    """tests/pg.py's server in a directory of its own under /tmp: as root, the server
    runs as `postgres`, which cannot enter pytest's root-only temporary tree."""
    directory = Path(tempfile.mkdtemp(prefix="textops-pg-"))
    try:
        with postgres_server(directory) as server:
            yield server
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    with throwaway_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def log_url(request, tmp_path):
    """A fresh, empty log on each kind of database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/log.db"
    server = request.getfixturevalue("postgres")
    store = open_store(server.url)  # one server for the module: empty its tables
    with store.connection:
        store.connection.cursor().execute("DELETE FROM feedback; DELETE FROM predictions")
    store.close()
    return server.url


# ---------------------------------------------------------------- the store


def test_the_schema_and_sqlite_settings(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/sub/log.db")  # the directory is created
    try:
        columns = {table: [row[1] for row in store.connection.execute(
            f"PRAGMA table_info({table})")] for table in ("predictions", "feedback")}
        assert columns == {
            "predictions": ["request_id", "position", "created", "model_version", "text",
                            "text_sha256", "probabilities", "label"],
            "feedback": ["request_id", "position", "label", "created"]}
        assert store.connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert store.connection.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
    finally:
        store.close()


def test_rows_hold_the_normalised_text_its_hash_and_the_answer():
    probs = np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32)
    rows = prediction_rows("r1", 12.5, fake_bundle("v7"), ["Great FILM", "Tie"], probs)
    assert rows[0] == ("r1", 0, 12.5, "v7", "great film",
                       hashlib.sha256(b"great film").hexdigest(), "[0.25, 0.75]", "pos")
    assert rows[1][1] == 1 and rows[1][-1] == "neg"  # a tie goes to the first label


def test_feedback_latest_label_wins_and_reads_back_in_label_order(log_url):
    store = open_store(log_url)
    try:
        store.write_predictions(rows_for("a", 1.0, ["pos", "neg"]) + rows_for("b", 2.0, ["pos"]))
        assert store.record_feedback([("a", 1, "pos")], created=10.0) == []
        assert store.record_feedback([("b", 0, "neg")], created=11.0) == []
        assert store.record_feedback([("a", 1, "neg")], created=12.0) == []  # replaces
    finally:
        store.close()
    labelled = read_labelled(log_url)
    assert [(r["request_id"], r["position"], r["label"], r["predicted"], r["created"])
            for r in labelled] == [("b", 0, "neg", "pos", 11.0), ("a", 1, "neg", "neg", 12.0)]
    assert labelled[1]["text"] == "text a 1" and labelled[1]["model_version"] == "v1"
    assert labelled[1]["text_sha256"] == hashlib.sha256(b"text a 1").hexdigest()
    assert [r["request_id"] for r in read_labelled(log_url, since=11.0)] == ["a"]


def test_a_batch_with_an_unknown_prediction_stores_nothing(log_url):
    store = open_store(log_url)
    try:
        store.write_predictions(rows_for("a", 1.0, ["pos"]))
        missing = store.record_feedback([("a", 0, "neg"), ("nope", 0, "pos"), ("a", 3, "pos")],
                                        created=5.0)
        assert missing == [("nope", 0), ("a", 3)]
        assert store.count("feedback") == 0
    finally:
        store.close()


def test_retention_by_age_and_by_row_count(log_url):
    store = open_store(log_url)
    try:
        now = 1_000_000.0
        day = 86400.0
        store.write_predictions(rows_for("old", now - 3 * day, ["pos", "neg"])
                                + [row for i in range(5)
                                   for row in rows_for(f"new{i}", now - i, ["pos"])])
        store.record_feedback([("old", 0, "pos"), ("new4", 0, "neg"), ("new0", 0, "pos")], 1.0)
        assert store.prune(now, max_age_s=2 * day, max_rows=100) == 2  # "old" is past age
        assert store.count("predictions") == 5 and store.count("feedback") == 2
        assert store.prune(now, max_age_s=2 * day, max_rows=3) == 2  # the two oldest go
        remaining = store.connection.cursor()
        remaining.execute("SELECT request_id FROM predictions ORDER BY created DESC")
        assert [r[0] for r in remaining.fetchall()] == ["new0", "new1", "new2"]
        assert store.count("feedback") == 1  # new4's label went with its prediction
    finally:
        store.close()


def test_live_stats_rest_on_the_latest_labels(log_url):
    store = open_store(log_url)
    try:
        store.write_predictions(rows_for("a", 1.0, ["pos", "pos", "neg", "neg", "pos"]))
        # (label, served): the oldest label is outside a window of 4
        labels = [("neg", 0), ("pos", 1), ("neg", 2), ("pos", 3), ("neg", 4)]
        for created, (label, position) in enumerate(labels):
            store.record_feedback([("a", position, label)], created=10.0 + created)
        stats = store.live_stats(window=4, since=0.0)
    finally:
        store.close()
    # window: pos/pos (right), neg/neg (right), pos/neg (wrong), neg/pos (wrong)
    assert stats.labels == 4 and stats.accuracy == 0.5
    assert stats.recall == {"neg": 0.5, "pos": 0.5}
    assert (stats.logged, stats.answered, stats.share) == (5, 5, 1.0)


def test_live_stats_without_labels():
    stats = LiveStats.from_pairs([], logged=0, answered=0)
    assert stats.accuracy is None and stats.share is None and stats.recall == {}


def test_reading_a_log_that_does_not_exist_names_it(tmp_path):
    with pytest.raises(PredictionLogError, match=r"nothing\.db: no prediction log there"):
        read_labelled(f"sqlite:///{tmp_path}/nothing.db")
    assert not (tmp_path / "nothing.db").exists()
    with pytest.raises(PredictionLogError, match="expected sqlite:///"):
        open_store("mysql://somewhere/db")


# ---------------------------------------------------------------- the writer


def test_sampling_is_decided_by_the_request_id():
    ids = [f"request-{i}" for i in range(20_000)]
    kept = [i for i in ids if sampled(i, 0.25)]
    assert 0.23 < len(kept) / len(ids) < 0.27
    assert kept == [i for i in ids if sampled(i, 0.25)]  # the same ids every time
    assert set(kept) <= {i for i in ids if sampled(i, 0.5)}  # a higher rate keeps them
    assert all(sampled(i, 1.0) for i in ids[:100]) and not any(sampled(i, 0) for i in ids)


def test_sampled_requests_are_logged_whole_or_not_at_all(tmp_path):
    url = f"sqlite:///{tmp_path}/log.db"
    writer = PredictionLog(url, ServiceMetrics(10), sample=0.3)
    writer.start()
    probs = np.array([[0.9, 0.1]] * 3, dtype=np.float32)
    for i in range(200):
        writer.record(f"r{i}", fake_bundle(), ["a", "b", "c"], probs)
    writer.close()
    store = open_store(url)
    try:
        cursor = store.connection.execute(
            "SELECT request_id, COUNT(*) FROM predictions GROUP BY request_id")
        logged = dict(cursor.fetchall())
    finally:
        store.close()
    assert set(logged) == {f"r{i}" for i in range(200) if sampled(f"r{i}", 0.3)}
    assert set(logged.values()) == {3}
    assert 40 < len(logged) < 80


def test_a_full_queue_drops_and_counts_entries_without_blocking(tmp_path):
    metrics = ServiceMetrics(10)
    writer = PredictionLog(f"sqlite:///{tmp_path}/log.db", metrics, queue_size=2)
    probs = np.array([[0.9, 0.1]] * 2, dtype=np.float32)
    started = time.perf_counter()
    for i in range(5):  # the thread is not started: nothing drains the queue
        writer.record(f"r{i}", fake_bundle(), ["a", "b"], probs)
    assert time.perf_counter() - started < 0.1
    assert counter(metrics, "textops_prediction_log_dropped_total", reason="queue_full") == 6
    writer.start()
    writer.close()
    assert counter(metrics, "textops_prediction_log_written_total") == 4
