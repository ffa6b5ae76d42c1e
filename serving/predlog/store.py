"""The prediction log's database: its schema, its URLs and one connection to it.

Four tables, the same SQL on SQLite (the default, one file in WAL mode) and
PostgreSQL (a team's server; the statements are in serving/predlog/schema.py):

    predictions(request_id, position, created, model_version, text, text_sha256,
                probabilities, label)     one row per text answered
    feedback(request_id, position, label, created)      one row per labelled text;
                                                        a repeated label replaces it
    shadow_predictions(request_id, position, created, model_version, probabilities,
                       label)             a challenger's answer in shadow mode, beside
                                          the champion's row
    canary_stops(challenger_version, champion_version, created, reason)
                                          a canary its guards stopped (schema.py)

`text` is the text *after the bundle's own normalisation and masking* (the
tokenizer.json normalizer: e-mail addresses, URLs and phone numbers are already
placeholders), so no raw personal data is stored. `created` is unix seconds. With the
log's keys set, `text` is a Fernet token and `text_sha256` a keyed hash,
`hmac-sha256:<hex>` (serving/predlog/crypto.py). A classifier's row holds its class
probabilities (a JSON list) and predicted class; a next-word model's, the prompt, its
answer as JSON (`{"next_words": [[word, p], ...]}`, or `{"completion", ...}` for
/generate) and the word it put first, which a label (the word typed next) is compared
with (serving/predlog/rows.py).

`LogStore` is one connection, each method one transaction; the service's writer
(serving/predlog/writer.py), the pipeline's reader (serving/predlog/reader.py) and the
settings' check of TEXTOPS_PREDICTION_LOG all go through this module, which needs
neither the service nor the metrics.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from serving.monitoring.live_stats import LiveStats
from serving.predlog.schema import (
    CLEAR_CANARY_STOP,
    FORGET_FEEDBACK,
    FORGET_SHADOW,
    INSERT_CANARY_STOP,
    INSERT_PREDICTION,
    INSERT_SHADOW,
    LABELLED,
    ORPHAN_FEEDBACK,
    ORPHAN_SHADOW,
    RECENT_LABELS,
    SCHEMA,
    UPSERT_FEEDBACK,
    created_name,
)


class PredictionLogError(RuntimeError):
    """A log URL that names no usable database; the message says which and why."""


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
        """`create=False`: a client of a log a server made (export, make retrain,
        canary stops), which needs it to exist and creates no table; one that only
        reads needs no more than a read-only database role."""
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
        # Deleted and overwritten rows (pruning, rotation's re-encryption) are zeroed,
        # not left readable in free pages, whatever the SQLite build's default.
        connection.execute("PRAGMA secure_delete=ON")
        if create:  # the writer's settings; WAL mode, once set, stays with the file
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s") if self.postgres else statement

    def _create_schema(self) -> None:
        if not self.postgres:
            with self.connection:
                cursor = self.connection.cursor()
                for statement in SCHEMA:
                    cursor.execute(statement)
            return
        # A replica opens the log while others write to it. CREATE INDEX locks its
        # table even when the index exists, so all of SCHEMA in one transaction held
        # one table while waiting for the next, which a writer inserting into both
        # held in the other order: a deadlock, and that writer's batch was lost. So:
        # only what is missing is created, one statement per transaction.
        for statement in SCHEMA:
            with self.connection:
                cursor = self.connection.cursor()
                # two replicas creating the same table at once would collide
                cursor.execute("SELECT pg_advisory_xact_lock(4711012)")
                # in the schema CREATE would create it in, not any on the search path
                cursor.execute("SELECT to_regclass(quote_ident(current_schema()) || '.' || %s)",
                               (created_name(statement),))
                if cursor.fetchone()[0] is None:
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
            self._executemany(cursor, FORGET_SHADOW, [row[:2] for row in rows])
            self._executemany(cursor, INSERT_PREDICTION, rows)

    def write_shadow(self, rows: list[tuple]) -> None:
        """A challenger's answers (request_id, position, created, model_version,
        probabilities, label) beside the champion's."""
        with self.connection:
            self._executemany(self.connection.cursor(), INSERT_SHADOW, rows)

    def record_canary_stop(self, challenger: str, champion: str, created: float,
                           reason: str) -> None:
        """That the guards stopped `challenger`'s canary beside `champion`, and why (a
        stop of it already recorded stands)."""
        with self.connection:
            self.connection.cursor().execute(self._sql(INSERT_CANARY_STOP),
                                             (challenger, champion, created, reason))

    def clear_canary_stop(self, challenger: str) -> None:
        """Delete `challenger`'s canary stop, if it has one."""
        with self.connection:
            self.connection.cursor().execute(self._sql(CLEAR_CANARY_STOP), (challenger,))

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
                cursor.execute(ORPHAN_SHADOW)
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

    def rows(self, statement: str, args: tuple = ()) -> list[tuple]:
        """A read query's rows (`?` placeholders, as SQLite writes them)."""
        with self.connection:
            cursor = self.connection.cursor()
            cursor.execute(self._sql(statement), args)
            return cursor.fetchall()

    def positions(self, request_id: str) -> set[int]:
        """The logged positions of a request, in one read: none when it is not logged."""
        with self.connection:
            cursor = self.connection.cursor()
            cursor.execute(self._sql("SELECT position FROM predictions WHERE request_id = ?"),
                           (request_id,))
            return {row[0] for row in cursor.fetchall()}

    def count(self, table: str) -> int:
        if table not in ("predictions", "feedback", "shadow_predictions"):
            raise ValueError(table)
        with self.connection:
            cursor = self.connection.cursor()
            cursor.execute(f"SELECT COUNT(*) FROM {table}")  # noqa: S608 - checked above
            return cursor.fetchone()[0]


def open_store(url: str, create: bool = True) -> LogStore:
    """A connection to the log at `url`, its tables created if missing; with
    `create=False` a SQLite file that does not exist is an error, not a new log."""
    return LogStore(url, create=create)
