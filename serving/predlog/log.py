"""The prediction log: what the service answered, and the labels users sent back.

Two tables, the same SQL on SQLite (the default, one file in WAL mode) and PostgreSQL
(a team's server):

    predictions(request_id, position, created, model_version, text, text_sha256,
                probabilities, label)     one row per text answered
    feedback(request_id, position, label, created)      one row per labelled text;
                                                        a repeated label replaces it

`text` is the text *after the bundle's own normalisation and masking* (the
tokenizer.json normalizer: e-mail addresses, URLs and phone numbers are already
placeholders), so no raw personal data is stored. `created` is unix seconds.

The service writes through `PredictionLog`: a request only puts a tuple on a bounded
queue (a full queue drops the entry and counts it, never the request); one thread turns
entries into rows (the normalisation in a child process, off the service's GIL) and
inserts them in batches, one transaction each. When the database
fails, batches are dropped and counted, the error is logged once and the connection is
retried with backoff; retention (by age and by row count) and the live-quality figures
are the same thread's periodic work.

The pipeline reads the labelled rows with `read_labelled(url)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing
import os
import pickle
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from serving.api.schemas import issued_within

if TYPE_CHECKING:
    import numpy as np

    from serving.bundle import Bundle
    from serving.monitoring.metrics import ServiceMetrics

log = logging.getLogger("serving.predlog.log")

# DOUBLE PRECISION, not REAL: PostgreSQL's REAL is 4 bytes, which holds unix seconds
# only to about two minutes. SQLite reads either name as its 8-byte REAL.
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS predictions (
        request_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        model_version TEXT NOT NULL,
        text TEXT NOT NULL,
        text_sha256 TEXT NOT NULL,
        probabilities TEXT NOT NULL,
        label TEXT NOT NULL,
        PRIMARY KEY (request_id, position))""",
    """CREATE TABLE IF NOT EXISTS feedback (
        request_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        label TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (request_id, position))""",
    "CREATE INDEX IF NOT EXISTS predictions_created ON predictions (created)",
    "CREATE INDEX IF NOT EXISTS feedback_created ON feedback (created)",
)

# A client reusing a request id replaces its earlier answer: the latest is the one a
# label sent afterwards refers to, and a label of the earlier answer goes with it.
FORGET_FEEDBACK = "DELETE FROM feedback WHERE request_id = ? AND position = ?"
INSERT_PREDICTION = """
    INSERT INTO predictions (request_id, position, created, model_version, text,
                             text_sha256, probabilities, label)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (request_id, position) DO UPDATE SET
        created = excluded.created, model_version = excluded.model_version,
        text = excluded.text, text_sha256 = excluded.text_sha256,
        probabilities = excluded.probabilities, label = excluded.label"""

UPSERT_FEEDBACK = """
    INSERT INTO feedback (request_id, position, label, created) VALUES (?, ?, ?, ?)
    ON CONFLICT (request_id, position) DO UPDATE SET
        label = excluded.label, created = excluded.created"""

LABELLED = """
    SELECT f.request_id, f.position, p.text, p.text_sha256, f.label, p.label,
           p.model_version, f.created
    FROM feedback f JOIN predictions p
         ON p.request_id = f.request_id AND p.position = f.position
    WHERE f.created > ?
    ORDER BY f.created, f.request_id, f.position"""

# The latest labels of one model's answers first: live accuracy rests on the most
# recent window of the model being served, so a promotion starts a window of its own
# (the old model's mistakes would otherwise keep the retrain trigger firing).
RECENT_LABELS = """
    SELECT f.label, p.label
    FROM feedback f JOIN predictions p
         ON p.request_id = f.request_id AND p.position = f.position
    WHERE p.model_version = ?
    ORDER BY f.created DESC LIMIT ?"""

ORPHAN_FEEDBACK = """
    DELETE FROM feedback WHERE NOT EXISTS (
        SELECT 1 FROM predictions p
        WHERE p.request_id = feedback.request_id AND p.position = feedback.position)"""


class PredictionLogError(RuntimeError):
    """A log URL that names no usable database; the message says which and why."""


# A label for an answer this young may reach the log before the answer does (each
# replica writes every 0.1 s, later when busy): "try again", not "unknown".
RECENT_ANSWER_S = 30.0
# How long a label waits for another process's writer to log its answer before the
# client is told to try again: a worker beside this one writes every 0.1 s.
SIBLING_WAIT_S = 1.0


class LogBehind(RuntimeError):
    """The writer has not caught up with the answers given so far: a label may refer
    to one not yet written, so it cannot be told apart from an unknown one."""


# ---------------------------------------------------------------- the database


def sqlite_path(url: str) -> Path | None:
    """The file of a `sqlite:///path` URL (relative to the working directory;
    `sqlite:////abs/path` for an absolute one), None for any other URL."""
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def is_postgres(url: str) -> bool:
    return url.split("://", 1)[0] in ("postgresql", "postgres", "postgresql+psycopg2")


def redacted(url: str) -> str:
    """`url` without its password, for logs and messages."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


URL_FORMS = "sqlite:///<path> or postgresql://..."


def check_url(url: str) -> str:
    """`url` if it names a database the log can use, else PredictionLogError."""
    if sqlite_path(url) is None and not is_postgres(url):
        raise PredictionLogError(f"{url!r}: expected {URL_FORMS}")
    return url


class LogStore:
    """One connection to the log database. Every method is one transaction."""

    def __init__(self, url: str, create: bool = True):
        """`create=False`: a reader (export, make retrain), which needs the log to
        exist and changes nothing, so a read-only database role is enough."""
        self.url = check_url(url)
        self.postgres = is_postgres(url)
        self.connection = self._connect(create)
        if create:
            self._create_schema()

    def _connect(self, create: bool):
        if self.postgres:
            import psycopg2  # only a PostgreSQL log needs it

            dsn = self.url.replace("postgresql+psycopg2://", "postgresql://", 1)
            return psycopg2.connect(dsn, connect_timeout=5)
        path = sqlite_path(self.url)
        if not create and not path.is_file():
            raise PredictionLogError(f"{path}: no prediction log there")
        path.parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread off: a store moves between the threads of asyncio.to_thread,
        # one at a time (its owner holds a lock).
        connection = sqlite3.connect(path, timeout=5, check_same_thread=False)
        if create:  # the writer's settings; WAL mode, once set, stays with the file
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s") if self.postgres else statement

    def _create_schema(self) -> None:
        with self.connection:
            cursor = self.connection.cursor()
            if self.postgres:  # two replicas creating the tables at once would collide
                cursor.execute("SELECT pg_advisory_xact_lock(4711012)")
            for statement in SCHEMA:
                cursor.execute(statement)

    def close(self) -> None:
        try:
            self.connection.close()
        except Exception:  # noqa: BLE001, S110 - a broken connection closes as it can
            pass

    def _executemany(self, cursor, statement: str, rows: list[tuple]) -> None:
        if self.postgres:  # psycopg2's executemany is a round trip per row
            from psycopg2.extras import execute_batch

            execute_batch(cursor, self._sql(statement), rows, page_size=200)
        else:
            cursor.executemany(statement, rows)

    # ------------------------------------------------------------ writing

    def write_predictions(self, rows: list[tuple]) -> None:
        with self.connection:
            cursor = self.connection.cursor()
            self._executemany(cursor, FORGET_FEEDBACK, [row[:2] for row in rows])
            self._executemany(cursor, INSERT_PREDICTION, rows)

    def record_feedback(self, items: list[tuple[str, int, str]], created: float
                        ) -> list[tuple[str, int]]:
        """Store (request_id, position, label) labels, all or none: the (request_id,
        position) pairs with no logged prediction, empty when the labels were stored."""
        with self.connection:
            cursor = self.connection.cursor()
            missing = []
            for request_id, position, _ in items:
                cursor.execute(self._sql("SELECT 1 FROM predictions WHERE request_id = ? "
                                         "AND position = ?"), (request_id, position))
                if cursor.fetchone() is None:
                    missing.append((request_id, position))
            if not missing:
                self._executemany(cursor, UPSERT_FEEDBACK,
                                  [(r, p, label, created) for r, p, label in items])
        return missing

    def prune(self, now: float, max_age_s: float, max_rows: int) -> int:
        """Delete predictions older than `max_age_s` and the oldest beyond `max_rows`
        (with their labels); the number of predictions deleted."""
        with self.connection:
            cursor = self.connection.cursor()
            cursor.execute(self._sql("DELETE FROM predictions WHERE created < ?"),
                           (now - max_age_s,))
            deleted = cursor.rowcount
            # The newest row beyond the limit: it and everything older goes (ties at
            # the boundary go too, so the table never holds more than max_rows).
            cursor.execute(self._sql("SELECT created FROM predictions ORDER BY created DESC "
                                     "LIMIT 1 OFFSET ?"), (max_rows,))
            boundary = cursor.fetchone()
            if boundary is not None:
                cursor.execute(self._sql("DELETE FROM predictions WHERE created <= ?"),
                               boundary)
                deleted += cursor.rowcount
            if deleted:
                cursor.execute(ORPHAN_FEEDBACK)
        return deleted

    # ------------------------------------------------------------ reading

    def labelled(self, since: float | None = None) -> list[dict]:
        with self.connection:
            cursor = self.connection.cursor()
            cursor.execute(self._sql(LABELLED), (float("-inf") if since is None else since,))
            rows = cursor.fetchall()
        keys = ("request_id", "position", "text", "text_sha256", "label", "predicted",
                "model_version", "created")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def live_stats(self, model_version: str, window: int, since: float) -> LiveStats:
        """Accuracy and recall over the latest `window` labels of `model_version`'s
        answers; the share of the predictions logged since `since` that received a label."""
        with self.connection:
            cursor = self.connection.cursor()
            cursor.execute(self._sql(RECENT_LABELS), (model_version, window))
            pairs = cursor.fetchall()
            cursor.execute(self._sql("SELECT COUNT(*) FROM predictions WHERE created >= ?"),
                           (since,))
            (logged,) = cursor.fetchone()
            cursor.execute(self._sql("SELECT COUNT(*) FROM feedback f JOIN predictions p ON "
                                     "p.request_id = f.request_id AND p.position = f.position "
                                     "WHERE p.created >= ?"), (since,))
            (answered,) = cursor.fetchone()
        return LiveStats.from_pairs(pairs, logged, answered)

    def has_request(self, request_id: str) -> bool:
        with self.connection:
            cursor = self.connection.cursor()
            cursor.execute(self._sql("SELECT 1 FROM predictions WHERE request_id = ? LIMIT 1"),
                           (request_id,))
            return cursor.fetchone() is not None

    def count(self, table: str) -> int:
        if table not in ("predictions", "feedback"):
            raise ValueError(table)
        with self.connection:
            cursor = self.connection.cursor()
            cursor.execute(f"SELECT COUNT(*) FROM {table}")  # noqa: S608 - checked above
            return cursor.fetchone()[0]


def open_store(url: str, create: bool = True) -> LogStore:
    """A connection to the log at `url`, its tables created if missing; with
    `create=False` a SQLite file that does not exist is an error, not a new log."""
    return LogStore(url, create=create)


def read_labelled(url: str, since: float | None = None) -> list[dict]:
    """Every labelled prediction (labelled after `since`, unix seconds, if given), in
    the order the labels came: {request_id, position, text, text_sha256, label (the
    feedback's), predicted (the service's), model_version, created (of the label)}."""
    store = open_store(url, create=False)
    try:
        return store.labelled(since)
    finally:
        store.close()


@dataclass
class LiveStats:
    """What the latest labels say about the served answers."""

    labels: int = 0  # labels the accuracy rests on
    correct: int = 0
    recall: dict[str, float] = field(default_factory=dict)  # per true label
    logged: int = 0  # predictions in the retention window
    answered: int = 0  # of those, the ones that received a label
    as_of: float = 0.0  # time.monotonic() when the reading began

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]], logged: int, answered: int
                   ) -> LiveStats:
        """From (label, predicted) pairs."""
        seen: dict[str, list[int]] = {}
        labels = correct = 0
        for truth, predicted in pairs:
            hits = seen.setdefault(truth, [0, 0])
            hits[0] += truth == predicted
            hits[1] += 1
            correct += truth == predicted
            labels += 1
        return cls(labels=labels, correct=correct,
                   recall={name: hit / total for name, (hit, total) in sorted(seen.items())},
                   logged=logged, answered=answered)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labels if self.labels else None

    @property
    def share(self) -> float | None:
        return self.answered / self.logged if self.logged else None


# ---------------------------------------------------------------- request ids and sampling


def sampled(request_id: str, rate: float) -> bool:
    """Whether `request_id` is logged at sampling `rate`: a hash of the id decides, so
    every text of a request is logged or none, the same way in every replica."""
    if rate >= 1:
        return True
    if rate <= 0:
        return False
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < rate * 2**64


def prediction_rows(request_id: str, created: float, bundle: Bundle, texts: list[str],
                    probs: np.ndarray, normalized: list[str] | None = None) -> list[tuple]:
    """The predictions rows of one request, its texts normalised and masked by the
    bundle's own tokenizer normalizer, as training saw them (`normalized`: already
    done, by `normalize_texts`)."""
    if normalized is None:
        normalized = normalize_texts(normalizer_state(bundle), texts)
    names, version = bundle.label_names, bundle.version
    rows = []
    for position, (stored, row) in enumerate(zip(normalized, probs.tolist(), strict=True)):
        label = names[row.index(max(row))]  # the first of ties, as /predict
        rows.append((request_id, position, created, version, stored,
                     hashlib.sha256(stored.encode()).hexdigest(), orjson.dumps(row).decode(),
                     label))
    return rows


# ---------------------------------------------------------------- normalising off the GIL

# The bundle's normalizer is a chain of some twenty regular-expression rules: about
# 40 us per SST-2 sentence, all of it holding the GIL, which the service's event loop
# needs. The writer has it done in a process of its own instead (Normalizer objects
# pickle as their JSON), so the service pays only for sending the texts across.
_NORMALIZERS: dict[bytes, object] = {}


def normalizer_state(bundle: Bundle) -> bytes | None:
    normalizer = bundle.tokenizer.normalizer
    return None if normalizer is None else pickle.dumps(normalizer)


def normalize_texts(state: bytes | None, texts: list[str]) -> list[str]:
    """`texts` through a pickled normalizer (unpickled once per process)."""
    if state is None:
        return list(texts)
    normalizer = _NORMALIZERS.get(state)
    if normalizer is None:
        normalizer = _NORMALIZERS[state] = pickle.loads(state)  # noqa: S301 - our own
    return [normalizer.normalize_str(text) for text in texts]


def _exit_with_parent(parent: int) -> None:
    """In the child: exit once the service is gone, however it went (a SIGKILL, or
    uvicorn re-raising SIGTERM, leaves it no time to stop its children)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


class Normalizing:
    """Normalises the texts of a batch of entries in a child process."""

    def __init__(self):
        self.pool: ProcessPoolExecutor | None = None
        self.states: dict[str, bytes | None] = {}  # by bundle version

    def __call__(self, entries: list[tuple]) -> list[list[str]]:
        """The normalised texts of each (request_id, created, bundle, texts, probs)."""
        by_bundle: dict[int, list[int]] = {}
        for i, entry in enumerate(entries):
            by_bundle.setdefault(id(entry[2]), []).append(i)
        normalized: list[list[str]] = [[] for _ in entries]
        for indices in by_bundle.values():
            bundle = entries[indices[0]][2]
            texts = [text for i in indices for text in entries[i][3]]
            done = iter(self._run(self._state(bundle), texts))
            for i in indices:
                normalized[i] = [next(done) for _ in entries[i][3]]
        return normalized

    def _state(self, bundle: Bundle) -> bytes | None:
        if bundle.version not in self.states:
            self.states[bundle.version] = normalizer_state(bundle)
        return self.states[bundle.version]

    def _run(self, state: bytes | None, texts: list[str]) -> list[str]:
        if self.pool is None:
            # spawn, not fork: the service's threads (uvicorn, onnxruntime) must not be
            # copied mid-work into the child
            self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_exit_with_parent,
                                            initargs=(os.getpid(),))
        try:
            return self.pool.submit(normalize_texts, state, texts).result(timeout=60)
        except Exception:
            self.close(wait=False)  # a broken or stuck child: the next batch starts anew
            raise

    def close(self, wait: bool = True) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=wait, cancel_futures=True)
            self.pool = None


# ---------------------------------------------------------------- the service's writer

STOP = object()


class Unavailable(Exception):
    """The database failed a moment ago; the next try waits for the backoff."""


class PredictionLog:
    """The service's log writer and feedback store (see the module docstring)."""

    def __init__(self, url: str, metrics: ServiceMetrics, queue_size: int = 10_000,
                 sample: float = 1.0, retention_days: float = 30,
                 max_rows: int = 1_000_000, feedback_window: int = 1000,
                 batch_size: int = 2000, linger_s: float = 0.1, prune_interval_s: float = 60,
                 stats_interval_s: float = 10, retry_s: tuple[float, float] = (0.2, 5.0)):
        self.url = check_url(url)
        self.metrics = metrics
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.sample, self.batch_size, self.linger_s = sample, batch_size, linger_s
        self.max_age_s, self.max_rows = retention_days * 86400, max_rows
        self.feedback_window = feedback_window
        self.served_version = ""  # the bundle being served: live accuracy is its own
        self.prune_interval_s, self.stats_interval_s = prune_interval_s, stats_interval_s
        self.stats_due = False  # set: read the live figures at the writer's next turn
        self.siblings = False  # set: other workers of this service write to this log
        self.retry_first_s, self.retry_max_s = retry_s
        # the writer thread's connection and its failure state
        self.store: LogStore | None = None
        self.failing: str | None = None  # the error being waited out, logged once
        self.dropped_while_failing = 0
        self.retry_delay, self.retry_at = self.retry_first_s, 0.0
        # feedback arrives on other threads: a connection of its own
        self.feedback_store: LogStore | None = None
        self.feedback_lock = threading.Lock()
        self.queue_full = metrics.log_dropped.labels("queue_full")
        self.normalizing = Normalizing()
        self.thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)

    @classmethod
    def from_settings(cls, settings, metrics: ServiceMetrics) -> PredictionLog:
        return cls(settings.prediction_log, metrics, queue_size=settings.prediction_log_queue,
                   sample=settings.prediction_log_sample,
                   retention_days=settings.prediction_log_retention_days,
                   max_rows=settings.prediction_log_max_rows,
                   feedback_window=settings.feedback_window)

    def start(self) -> None:
        self.thread.start()

    def close(self, timeout: float = 10) -> None:
        """Write what is queued (within `timeout`), then stop the thread."""
        try:
            self.queue.put(STOP, timeout=timeout)
        except queue.Full:
            log.warning("prediction log: the queue did not drain in %s s; stopping", timeout)
            return
        self.thread.join(timeout)
        with self.feedback_lock:
            if self.feedback_store is not None:
                self.feedback_store.close()

    # ------------------------------------------------------------ the request path

    def record(self, request_id: str, bundle: Bundle, texts: list[str],
               probs: np.ndarray) -> None:
        """Queue one answered request; never blocks, never raises for a full queue."""
        if not sampled(request_id, self.sample):
            return
        try:
            self.queue.put_nowait((request_id, time.time(), bundle, texts, probs))
        except queue.Full:
            self.queue_full.inc(len(texts))

    def refresh_stats(self) -> None:
        """Read the live figures again now, not at the next interval: another worker
        has stored labels."""
        self.stats_due = True
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(threading.Event())  # wakes the writer thread

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until what was queued before this call is written (or dropped)."""
        done = threading.Event()
        try:
            self.queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    # ------------------------------------------------------------ feedback

    def feedback(self, items: list[tuple[str, int, str]]) -> list[tuple[str, int]]:
        """Store labels (request_id, position, label), all or none, after the writer
        has caught up with the predictions answered so far; returns the pairs with no
        logged prediction (nothing stored then). Raises when the database fails."""
        if not self.flush():
            raise LogBehind("the prediction log is still writing earlier answers")
        deadline = time.monotonic() + SIBLING_WAIT_S
        while True:
            missing, unwritten, absent = self._record_feedback(items)
            # Another worker of this service (or a replica) may have answered a missing
            # request and be about to write it: our own ids say how recent they are; a
            # client's cannot, so with sibling workers an id not in the log at all
            # waits a moment too (the lock is not held meanwhile).
            if not (unwritten or (absent and self.siblings)) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if unwritten:  # answered by another replica that has not written it yet
            raise LogBehind(f"request_id {unwritten[0]!r} was answered less than "
                            f"{RECENT_ANSWER_S:.0f} s ago and is not in the log yet")
        return missing

    def _record_feedback(self, items: list[tuple[str, int, str]]
                         ) -> tuple[list[tuple[str, int]], list[str], list[str]]:
        """One attempt: the pairs with no logged prediction (nothing stored then), the
        missing ids of ours issued recently, and the missing ids not logged at all."""
        with self.feedback_lock:
            try:
                if self.feedback_store is None:
                    self.feedback_store = open_store(self.url)
                store = self.feedback_store
                missing = store.record_feedback(items, time.time())
                absent = [r for r in dict.fromkeys(r for r, _ in missing)
                          if not store.has_request(r)]
                unwritten = [r for r in absent if issued_within(r, RECENT_ANSWER_S)]
                if not missing:
                    self.metrics.live_quality.update(self._stats(store))
                return missing, unwritten, absent
            except Exception:
                if self.feedback_store is not None:
                    self.feedback_store.close()
                    self.feedback_store = None
                raise

    def _stats(self, store: LogStore) -> LiveStats:
        as_of = time.monotonic()
        stats = store.live_stats(self.served_version, self.feedback_window,
                                 time.time() - self.max_age_s)
        stats.as_of = as_of
        return stats

    # ------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        next_prune = next_stats = 0.0
        stats_of = None  # the model version the live figures are about
        stop = False
        while not stop:
            now = time.monotonic()  # first thing: a restarted service shows its figures
            if now >= next_prune and self._maintain(self._prune):
                next_prune = now + self.prune_interval_s
            # a new model gets figures of its own at once, not the old one's for 10 s
            version = self.served_version
            if now >= next_stats or version != stats_of or self.stats_due:
                self.stats_due = False
                if self._maintain(self._refresh_stats):
                    next_stats, stats_of = now + self.stats_interval_s, version
            entries, markers, stop = self._take()
            if entries:
                self._write(entries)
            for marker in markers:
                marker.set()
        if self.store is not None:
            self.store.close()
        self.normalizing.close()

    def _take(self) -> tuple[list[tuple], list[threading.Event], bool]:
        """The entries waiting (at least one, or a second's wait), flush markers, stop."""
        entries, markers = [], []
        try:
            item = self.queue.get(timeout=1.0)
        except queue.Empty:
            return entries, markers, False
        if item is not STOP and not isinstance(item, threading.Event):
            # Let a batch gather: one transaction and one wake-up of this thread per
            # batch, not per request (each wake-up takes the GIL from the event loop).
            time.sleep(self.linger_s)
        while True:
            if item is STOP:
                return entries, markers, True
            if isinstance(item, threading.Event):
                markers.append(item)
            else:
                entries.append(item)
            if len(entries) >= self.batch_size:
                return entries, markers, False
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return entries, markers, False

    def _connection(self) -> LogStore:
        if self.store is None:
            if self.failing and time.monotonic() < self.retry_at:
                raise Unavailable(self.failing)
            self.store = open_store(self.url)
        return self.store

    def _write(self, entries: list[tuple]) -> None:
        count = sum(len(entry[3]) for entry in entries)
        try:
            normalized = self.normalizing(entries)
            rows = [row for entry, texts in zip(entries, normalized, strict=True)
                    for row in prediction_rows(*entry, normalized=texts)]
            self._connection().write_predictions(rows)
        except Exception as err:  # noqa: BLE001 - the log drops entries, never fails
            self._failed(err, count)
            return
        self.metrics.log_written.inc(count)
        self._recovered()

    def _maintain(self, work) -> bool:
        """Run periodic work on the writer's connection; False if the database failed."""
        try:
            work(self._connection())
        except Exception as err:  # noqa: BLE001
            self._failed(err, 0)
            return False
        self._recovered()
        return True

    def _prune(self, store: LogStore) -> None:
        deleted = store.prune(time.time(), self.max_age_s, self.max_rows)
        if deleted:
            log.info("prediction log: %d predictions past retention deleted", deleted)

    def _refresh_stats(self, store: LogStore) -> None:
        self.metrics.live_quality.update(self._stats(store))

    def _failed(self, err: Exception, dropped: int) -> None:
        """Count the dropped rows; log the first error of an outage, back off."""
        if dropped:
            self.metrics.log_dropped.labels("error").inc(dropped)
            self.dropped_while_failing += dropped
        if isinstance(err, Unavailable):
            return
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.failing is None:
            # psycopg2 raises a second error ("connection already closed") while
            # leaving the transaction of a connection the server dropped: name the first
            cause = err.__context__ or err
            self.failing = f"{type(cause).__name__}: {' '.join(str(cause).split())}"
            log.error("prediction log %s failed (%s); dropping entries and retrying until "
                      "it works again", redacted(self.url), self.failing)
            self.retry_delay = self.retry_first_s
        else:
            self.retry_delay = min(self.retry_delay * 2, self.retry_max_s)
        self.retry_at = time.monotonic() + self.retry_delay

    def _recovered(self) -> None:
        if self.failing is not None:
            log.warning("prediction log %s recovered: writing again (%d predictions "
                        "dropped while it failed)", redacted(self.url), self.dropped_while_failing)
            self.failing, self.dropped_while_failing = None, 0
