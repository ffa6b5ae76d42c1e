"""The prediction log and feedback: the store on SQLite and PostgreSQL, the writer's
queue, sampling and retention, request ids and POST /feedback over real HTTP, live
accuracy in /metrics, and the log's faults (requests never fail because of it)."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
import time
from functools import partial
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from conftest import eventually, running_service
from pg import postgres_server
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import normalizers

from serving.bundle import Bundle
from serving.monitoring.live_stats import LiveStats
from serving.monitoring.metrics import ServiceMetrics
from serving.predlog.feedback import FeedbackStore
from serving.predlog.normalizer import Normalizing
from serving.predlog.reader import read_labelled
from serving.predlog.rows import prediction_rows, sampled
from serving.predlog.store import LogStore, PredictionLogError, open_store
from serving.predlog.writer import PredictionLog

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
                       hashlib.sha256(b"great film").hexdigest(), "[0.25,0.75]", "pos")
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


def test_a_label_for_an_answer_written_meanwhile_is_stored(tmp_path, monkeypatch):
    """The answer's rows land between the label's two reads (another worker's writer
    commits): the label is stored, not refused as unknown."""
    url = f"sqlite:///{tmp_path}/log.db"
    open_store(url).close()
    original = LogStore.record_feedback
    calls = []

    def writer_commits_after_the_first_read(store, items, created):
        missing = original(store, items, created)
        if not calls:
            writer = open_store(url)
            writer.write_predictions(rows_for("late", 1.0, ["pos"]))
            writer.close()
        calls.append(missing)
        return missing

    monkeypatch.setattr(LogStore, "record_feedback", writer_commits_after_the_first_read)
    labels = FeedbackStore(url, on_stored=lambda store: None)
    try:
        assert labels.record([("late", 0, "neg")], siblings=False) == []
    finally:
        labels.close()
    assert calls == [[("late", 0)], []]
    store = open_store(url)
    assert store.count("feedback") == 1
    store.close()


def test_a_label_after_a_broken_connection_opens_a_fresh_one(tmp_path):
    """A connection the database dropped (a restart, a broken network) fails the label
    sent on it, and the next label is stored through a new one."""
    url = f"sqlite:///{tmp_path}/log.db"
    writer = open_store(url)
    writer.write_predictions(rows_for("a", 1.0, ["pos"]) + rows_for("b", 1.0, ["neg"]))
    writer.close()
    labels = FeedbackStore(url, on_stored=lambda store: None)
    try:
        assert labels.record([("a", 0, "neg")], siblings=False) == []
        labels.connection.store.connection.close()  # what a restarted database leaves
        with pytest.raises(sqlite3.ProgrammingError):
            labels.record([("b", 0, "pos")], siblings=False)
        assert labels.record([("b", 0, "pos")], siblings=False) == []
    finally:
        labels.close()
    store = open_store(url)
    assert store.count("feedback") == 2
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
        stats = store.live_stats("v1", window=4, since=0.0)
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
    writer.close(timeout=120)  # room for a slow machine to start the normalizer
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


def test_a_challengers_batch_is_logged_request_by_request(tmp_path):
    url = f"sqlite:///{tmp_path}/log.db"
    writer = PredictionLog(url, ServiceMetrics(10))
    writer.start()
    # 60 requests of 1-3 texts in one batch; each text's answer names its request
    requests = [(f"r{i}", 1 + i % 3) for i in range(60)]
    probs = np.array([[i / 1000, 1 - i / 1000] for i, (_, items) in enumerate(requests)
                      for _ in range(items)], dtype=np.float32)
    writer.record_shadow(fake_bundle("challenger"), requests, probs)
    writer.close(timeout=120)
    store = open_store(url)
    try:
        rows = store.connection.execute(
            "SELECT request_id, position, model_version, probabilities, label "
            "FROM shadow_predictions").fetchall()
    finally:
        store.close()
    assert sorted((r, p) for r, p, *_ in rows) == sorted(
        (r, p) for r, items in requests for p in range(items))
    for request_id, _, version, answer, label in rows:
        number = int(request_id[1:])
        assert json.loads(answer) == pytest.approx([number / 1000, 1 - number / 1000])
        assert version == "challenger" and label == "pos"


def test_a_full_queue_drops_and_counts_entries_without_blocking(tmp_path):
    metrics = ServiceMetrics(10)
    writer = PredictionLog(f"sqlite:///{tmp_path}/log.db", metrics, queue_size=2)
    probs = np.array([[0.9, 0.1]] * 2, dtype=np.float32)
    # The thread is not started: nothing drains the queue, so a record that blocked
    # would never return.
    recording = threading.Thread(daemon=True, target=lambda: [
        writer.record(f"r{i}", fake_bundle(), ["a", "b"], probs) for i in range(5)])
    recording.start()
    recording.join(30)
    assert not recording.is_alive(), "record() blocked on a full queue"
    assert counter(metrics, "textops_prediction_log_dropped_total", reason="queue_full") == 6
    writer.start()
    writer.close(timeout=120)
    assert counter(metrics, "textops_prediction_log_written_total") == 4


# ---------------------------------------------------------------- over HTTP

PERSONAL = ("write to jane.doe@example.com, see https://example.org/private?id=7 "
            "or call +44 20 7946 0958 about this great film")
RAW_PERSONAL = ["jane.doe@example.com", "example.org/private", "7946 0958"]


def metric(url: str, name: str, **labels) -> float | None:
    """One sample of the service's /metrics, None when it is not exported."""
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def logged_rows(url: str, request_id: str) -> list[tuple]:
    store = open_store(url)
    try:
        cursor = store.connection.cursor()
        cursor.execute(store._sql("SELECT * FROM predictions WHERE request_id = ? "
                                  "ORDER BY position"), (request_id,))
        return cursor.fetchall()
    finally:
        store.close()


@pytest.fixture(scope="module")
def logged_service(built_bundle, tmp_path_factory):
    """The service with its prediction log in a SQLite file of its own."""
    directory = tmp_path_factory.mktemp("logged")
    url = f"sqlite:///{directory}/log.db"
    with running_service(built_bundle[0], directory, max_texts=8,
                         prediction_log=url) as service:
        service.log_url, service.db = url, directory / "log.db"
        yield service


def predict(url: str, texts: list[str], headers: dict | None = None) -> httpx.Response:
    response = httpx.post(f"{url}/predict", json={"texts": texts}, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response


def test_every_answer_carries_a_request_id(logged_service):
    issued = predict(logged_service.url, ["great film"])
    assert re.fullmatch(r"[0-9a-f]{32}", issued.json()["request_id"])
    assert issued.headers["x-request-id"] == issued.json()["request_id"]
    kept = predict(logged_service.url, ["great film"], {"X-Request-ID": "client-7:a.b_c"})
    assert kept.json()["request_id"] == kept.headers["x-request-id"] == "client-7:a.b_c"
    for bad in ("has space", "x" * 129, "semi;colon", ""):
        replaced = predict(logged_service.url, ["great film"], {"X-Request-ID": bad})
        assert re.fullmatch(r"[0-9a-f]{32}", replaced.json()["request_id"]), bad
        assert replaced.headers["x-request-id"] == replaced.json()["request_id"]


def test_v2_infer_answers_carry_the_request_id(logged_service, built_bundle):
    url = f"{logged_service.url}/v2/models/{built_bundle[1]['model_name']}/infer"

    def infer(body_id=None, header=None) -> httpx.Response:
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                            "data": ["great film"]}]}
        if body_id is not None:
            body["id"] = body_id
        response = httpx.post(url, json=body, headers=header or {}, timeout=30)
        assert response.status_code == 200, response.text
        return response

    own = infer(body_id="v2-request-1")
    assert own.json()["id"] == own.headers["x-request-id"] == "v2-request-1"
    assert own.json()["parameters"] == {"request_id": "v2-request-1"}
    from_header = infer(header={"X-Request-ID": "from-header"})
    assert from_header.json()["id"] == from_header.headers["x-request-id"] == "from-header"
    # the protocol echoes any id; the log and the header take a well-formed one
    odd = infer(body_id="an id with spaces")
    assert odd.json()["id"] == "an id with spaces"
    assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["x-request-id"])
    assert odd.json()["parameters"]["request_id"] == odd.headers["x-request-id"]
    eventually(lambda: logged_rows(logged_service.log_url, "v2-request-1"))


def test_the_log_holds_masked_text_its_hash_and_the_answer(logged_service):
    answer = predict(logged_service.url, [PERSONAL, "dull"]).json()
    rows = eventually(lambda: logged_rows(logged_service.log_url, answer["request_id"]))
    assert [row[1] for row in rows] == [0, 1]
    for row, served in zip(rows, answer["predictions"], strict=True):
        _, _, created, version, text, digest, probabilities, label = row
        assert abs(created - time.time()) < 60 and version == answer["model_version"]
        assert digest == hashlib.sha256(text.encode()).hexdigest()
        assert label == served["label"]
        assert json.loads(probabilities) == pytest.approx(
            [served["probabilities"][name] for name in ("neg", "pos")])
    assert {"[email]", "[url]", "[phone]"} <= set(rows[0][4].split())
    # nowhere in the database's files, its write-ahead log included
    stored = b"".join(path.read_bytes() for path in logged_service.db.parent.glob("log.db*"))
    for raw in RAW_PERSONAL:
        assert raw.encode() not in stored, raw


def post_feedback(url: str, body) -> httpx.Response:
    return httpx.post(f"{url}/feedback", json=body, timeout=30)


def test_feedback_is_stored_and_the_latest_label_wins(logged_service):
    url = logged_service.url
    first = predict(url, ["great superb film", "awful dull boring plot"]).json()["request_id"]
    second = predict(url, ["lovely"]).json()["request_id"]
    # right after the answers: the log catches up before feedback is checked
    assert post_feedback(url, {"request_id": first, "label": "neg"}).json() == {"accepted": 1}
    answer = post_feedback(url, [{"request_id": first, "label": "pos", "position": 0},
                                 {"request_id": first, "label": "neg", "position": 1},
                                 {"request_id": second, "label": "pos"}])
    assert answer.status_code == 200 and answer.json() == {"accepted": 3}
    labelled = {(r["request_id"], r["position"]): r["label"]
                for r in read_labelled(logged_service.log_url)}
    assert labelled[(first, 0)] == "pos" and labelled[(first, 1)] == "neg"
    assert labelled[(second, 0)] == "pos"


BAD_FEEDBACK = [
    # (body, status, code, words in the message)
    ([{"label": "pos"}], 422, "invalid_request", "[0].request_id: Field required"),
    ({"request_id": "x", "label": "pos", "position": -1}, 422, "invalid_request",
     "body.position"),
    ({"request_id": "x", "label": "pos", "colour": 1}, 422, "invalid_request", "colour"),
    ([], 422, "no_feedback", "at least one"),
    ([{"request_id": "x", "label": "pos"}] * 9, 422, "too_many_items", "at most 8"),
    ("a string", 422, "invalid_request", "feedback object or a list"),
    (b'{"request_id": ', 400, "invalid_json", "not valid JSON"),
]


@pytest.mark.parametrize("body,status,code,words", BAD_FEEDBACK,
                         ids=[f"{r[2]}{i}" for i, r in enumerate(BAD_FEEDBACK)])
def test_bad_feedback_gets_a_clear_error(logged_service, body, status, code, words):
    if isinstance(body, bytes):
        response = httpx.post(f"{logged_service.url}/feedback", content=body,
                              headers={"Content-Type": "application/json"})
    else:
        response = post_feedback(logged_service.url, body)
    assert response.status_code == status, response.text
    assert response.json()["code"] == code and words in response.json()["error"]


def test_a_bad_item_leaves_the_whole_batch_unwritten(logged_service):
    url, log_url = logged_service.url, logged_service.log_url
    rid = predict(url, ["fine movie", "bad"]).json()["request_id"]
    before = read_labelled(log_url)
    unknown_id = post_feedback(url, [{"request_id": rid, "label": "pos"},
                                     {"request_id": "never-answered", "label": "neg"}])
    assert unknown_id.status_code == 404
    assert unknown_id.json()["code"] == "unknown_prediction"
    assert "'never-answered' position 0" in unknown_id.json()["error"]
    unknown_position = post_feedback(url, {"request_id": rid, "label": "pos", "position": 2})
    assert unknown_position.status_code == 404 and "position 2" in unknown_position.json()[
        "error"]
    unknown_label = post_feedback(url, [{"request_id": rid, "label": "pos"},
                                        {"request_id": rid, "label": "meh", "position": 1}])
    assert unknown_label.status_code == 422
    assert unknown_label.json()["code"] == "unknown_label"
    assert unknown_label.json()["error"] == ("[1].label: 'meh' is not a label of the model "
                                             "(labels: neg, pos)")
    assert unknown_label.json()["labels"] == ["neg", "pos"]
    assert read_labelled(log_url) == before


def test_live_accuracy_in_metrics_matches_the_labels_sent_and_survives_a_restart(
        built_bundle, tmp_path):
    url = f"sqlite:///{tmp_path}/log.db"
    with running_service(built_bundle[0], tmp_path, prediction_log=url) as service:
        eventually(lambda: metric(service.url, "textops_live_labels") == 0)  # read, empty
        answer = predict(service.url, TEXTS + ["the acting", "a plot"]).json()
        served = [p["label"] for p in answer["predictions"]]
        other = {"neg": "pos", "pos": "neg"}
        # the first four right, the next two wrong, the last two unlabelled
        truth = served[:4] + [other[label] for label in served[4:6]]
        sent = post_feedback(service.url, [
            {"request_id": answer["request_id"], "position": i, "label": label}
            for i, label in enumerate(truth)])
        assert sent.json() == {"accepted": 6}
        expected = {"textops_live_labels": 6, "textops_live_accuracy": 4 / 6,
                    "textops_feedback_share": 6 / 8}
        recall = {name: sum(t == s == name for t, s in zip(truth, served, strict=False))
                  / truth.count(name) for name in set(truth)}
        # Any worker may answer a scrape: the one that stored the labels has the new
        # figures at once, the others within a fraction of a second.
        for name, value in expected.items():
            eventually(partial(shown, service.url, name, value), timeout=5)
        for name, value in recall.items():
            eventually(partial(shown, service.url, "textops_live_recall", value,
                               label=name), timeout=5)
        assert metric(service.url, "textops_feedback_total") == 6
        assert metric(service.url, "textops_prediction_log_written_total") == 8
    with running_service(built_bundle[0], tmp_path, prediction_log=url) as service:
        # every worker reads the figures from the database when it starts: in time,
        # four scrapes in a row (each may reach either worker) all show them
        for name, value in expected.items():
            eventually(lambda: all(shown(service.url, name, value)  # noqa: B023
                                   for _ in range(4)))


def shown(url: str, name: str, value: float, **labels) -> bool:
    return metric(url, name, **labels) == pytest.approx(value)


def test_the_normalizing_process_gives_the_bundles_own_normalisation(built_bundle):
    bundle = Bundle.load(built_bundle[0])
    texts = [PERSONAL, "Some <b>HTML</b> &amp; TEXT", "plain"]
    normalizing = Normalizing()
    try:
        normalized = normalizing([("a", 0.0, bundle, texts[:2], None),
                                  ("b", 0.0, bundle, texts[2:], None)])
    finally:
        normalizing.close()
    in_process = [bundle.tokenizer.normalizer.normalize_str(text) for text in texts]
    assert normalized == [in_process[:2], in_process[2:]]
    assert "[email]" in normalized[0][0] and "<b>" not in normalized[0][1]


# ---------------------------------------------------------------- PostgreSQL and faults


class Load:
    """/predict requests one after another on a thread until stopped; every status."""

    def __init__(self, url: str):
        self.url, self.statuses, self.done = url, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.done.is_set():
                self.statuses.append(client.post("/predict", json={"texts": TEXTS[:2]})
                                     .status_code)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def logged_again(url: str) -> bool:
    """Whether a new answer reaches the log: feedback on it is stored only then (it
    waits for the writer to catch up)."""
    rid = predict(url, ["after"]).json()["request_id"]
    return post_feedback(url, {"request_id": rid, "label": "pos"}).status_code == 200


def log_lines(service, words: str) -> list[str]:
    return [line for line in service.log_path.read_text().splitlines() if words in line]


def test_log_and_feedback_on_postgresql(built_bundle, tmp_path, postgres):
    with running_service(built_bundle[0], tmp_path, prediction_log=postgres.url) as service:
        answer = predict(service.url, [PERSONAL, "dull"], {"X-Request-ID": "pg-1"}).json()
        assert post_feedback(service.url, [{"request_id": "pg-1", "label": "pos"},
                                           {"request_id": "pg-1", "label": "neg",
                                            "position": 1}]).json() == {"accepted": 2}
        assert post_feedback(service.url, {"request_id": "pg-2", "label": "pos"}
                             ).status_code == 404
        assert metric(service.url, "textops_live_labels") >= 2
    labelled = [r for r in read_labelled(postgres.url) if r["request_id"] == "pg-1"]
    assert [(r["position"], r["label"]) for r in labelled] == [(0, "pos"), (1, "neg")]
    assert [r["predicted"] for r in labelled] == [p["label"] for p in answer["predictions"]]
    assert "[email]" in labelled[0]["text"] and "jane.doe" not in labelled[0]["text"]
    assert labelled[0]["model_version"] == answer["model_version"]


def test_a_stopped_postgresql_fails_no_request_and_the_log_recovers(built_bundle, tmp_path):
    with postgres_server() as server, running_service(
            built_bundle[0], tmp_path, prediction_log=server.url, workers=2) as service:
        url = service.url
        with Load(url) as load:
            eventually(lambda: metric(url, "textops_prediction_log_written_total"))
            server.stop()
            eventually(lambda: metric(url, "textops_prediction_log_dropped_total",
                                      reason="error") >= 20)
            # feedback cannot be stored now, and says so
            down = post_feedback(url, {"request_id": "x", "label": "pos"})
            assert down.status_code == 503 and down.json()["code"] == "log_unavailable"
            server.start()
            eventually(lambda: logged_again(url), timeout=30)
        assert len(load.statuses) > 20 and set(load.statuses) == {200}
        # once per outage and server process, not once per dropped batch
        assert 1 <= len(log_lines(service, "failed (")) <= 2, service.log_tail()
        assert 1 <= len(log_lines(service, "recovered: writing again")) <= 2, \
            service.log_tail()


def test_an_unwritable_sqlite_file_fails_no_request_and_the_log_recovers(built_bundle,
                                                                       tmp_path):
    # Root ignores file modes, so the fault is a directory where the file should be.
    database = tmp_path / "log.db"
    database.mkdir()
    with running_service(built_bundle[0], tmp_path, workers=2,
                         prediction_log=f"sqlite:///{database}") as service:
        statuses = [predict(service.url, TEXTS[:2]).status_code for _ in range(10)]
        eventually(lambda: metric(service.url, "textops_prediction_log_dropped_total",
                                  reason="error") == 20)
        assert metric(service.url, "textops_prediction_log_written_total") == 0
        database.rmdir()
        eventually(lambda: logged_again(service.url), timeout=30)
        assert set(statuses) == {200}
        assert 1 <= len(log_lines(service, "failed (")) <= 2, service.log_tail()
        assert "unable to open database file" in log_lines(service, "failed (")[0]
        assert 1 <= len(log_lines(service, "recovered: writing again")) <= 2, \
            service.log_tail()


def test_the_writer_enforces_retention_itself(tmp_path):
    """The writer's own periodic pruning (LogStore.prune): rows past `retention_days`
    go even while the log holds fewer than `max_rows`, and of what it wrote, exactly
    the `max_rows` newest remain."""
    url = f"sqlite:///{tmp_path}/log.db"
    store = open_store(url)
    metrics = ServiceMetrics(10)
    writer = PredictionLog(url, metrics, retention_days=1, max_rows=5,
                           prune_interval_s=0.05, linger_s=0.01)

    def kept() -> list[str]:
        return sorted(request_id for (request_id,) in store.connection.execute(
            "SELECT request_id FROM predictions"))

    try:
        # two days old, and fewer than max_rows: only the age limit removes these
        store.write_predictions(rows_for("stale", time.time() - 2 * 86400, ["pos", "neg"]))
        assert kept() == ["stale", "stale"]
        writer.start()
        eventually(lambda: kept() == [], timeout=10)
        probs = np.array([[0.9, 0.1]], dtype=np.float32)
        for i in range(12):
            writer.record(f"r{i:02d}", fake_bundle(), ["a"], probs)
            time.sleep(0.002)  # distinct `created`: ties at the boundary would go together
        assert writer.flush()
        assert counter(metrics, "textops_prediction_log_written_total") == 12
        eventually(lambda: kept() == [f"r{i:02d}" for i in range(7, 12)], timeout=10)
    finally:
        writer.close()
        store.close()


def test_a_bad_log_setting_names_the_variable(monkeypatch):
    from serving.settings import Settings, SettingsError

    monkeypatch.setenv("TEXTOPS_PREDICTION_LOG", "mysql://db/log")
    with pytest.raises(SettingsError, match=r"TEXTOPS_PREDICTION_LOG='mysql://db/log': "
                                            r"expected sqlite:///<path> or postgresql://"):
        Settings.from_env()
    monkeypatch.setenv("TEXTOPS_PREDICTION_LOG", "")
    monkeypatch.setenv("TEXTOPS_PREDICTION_LOG_SAMPLE", "1.5")
    with pytest.raises(SettingsError, match="TEXTOPS_PREDICTION_LOG_SAMPLE='1.5'"):
        Settings.from_env()


def test_with_the_log_off_answers_keep_their_id_and_feedback_says_why(built_bundle, tmp_path):
    with running_service(built_bundle[0], tmp_path, prediction_log="") as service:
        answer = predict(service.url, ["great film"])
        assert answer.headers["x-request-id"] == answer.json()["request_id"]
        refused = post_feedback(service.url, {"request_id": answer.json()["request_id"],
                                              "label": "pos"})
        assert refused.status_code == 404 and refused.json()["code"] == "disabled"
        assert "TEXTOPS_PREDICTION_LOG" in refused.json()["error"]
        assert metric(service.url, "textops_live_labels") is None
    assert not list(tmp_path.glob("*.db"))


def test_new_request_ids_are_unique_and_ordered_by_time():
    from serving.request_ids import new_request_id, request_id

    ids = []
    for _ in range(3):
        ids += [new_request_id() for _ in range(1000)]
        time.sleep(0.002)
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    # time first: a later batch sorts after an earlier one (the log's index grows at one end)
    assert max(ids[:1000]) < min(ids[2000:])
    assert request_id("client-1") == "client-1" and request_id("bad id") != "bad id"


def test_live_accuracy_is_the_served_models_own(log_url):
    """After a promotion the old model's mistakes no longer count against the new one
    (they would keep the retrain trigger firing)."""
    store = open_store(log_url)
    try:
        store.write_predictions(rows_for("old", 1.0, ["pos", "pos"], version="v1"))
        store.write_predictions(rows_for("new", 2.0, ["neg"], version="v2"))
        store.record_feedback([("old", 0, "neg"), ("old", 1, "neg"), ("new", 0, "neg")], 3.0)
        old, new = (store.live_stats(version, window=10, since=0.0) for version in ("v1", "v2"))
    finally:
        store.close()
    assert (old.labels, old.accuracy) == (2, 0.0)
    assert (new.labels, new.accuracy) == (1, 1.0)


def test_a_reused_request_id_drops_the_earlier_answers_label(log_url):
    store = open_store(log_url)
    try:
        store.write_predictions(rows_for("client-1", 1.0, ["pos"]))
        store.record_feedback([("client-1", 0, "neg")], 2.0)
        store.write_predictions(rows_for("client-1", 3.0, ["neg"]))  # a new text, same id
        labelled = store.labelled(None)
    finally:
        store.close()
    assert labelled == []  # the label was about the earlier text


def test_only_our_recent_ids_count_as_recent():
    from serving.request_ids import issued_within, new_request_id

    assert issued_within(new_request_id(), 30)
    assert not issued_within("client-1", 30)
    assert not issued_within("0" * 32, 30)  # 1970


def test_a_label_for_a_just_issued_id_not_yet_logged_is_retried_not_refused(logged_service):
    """Another replica may have answered it and not written it yet: 503 with
    Retry-After, where an old or foreign unknown id gets 404."""
    from serving.request_ids import new_request_id

    young = post_feedback(logged_service.url, {"request_id": new_request_id(), "label": "pos"})
    assert young.status_code == 503 and young.headers["Retry-After"] == "1"
    assert young.json()["code"] == "not_logged_yet"
    foreign = post_feedback(logged_service.url, {"request_id": "client-never", "label": "pos"})
    assert foreign.status_code == 404
