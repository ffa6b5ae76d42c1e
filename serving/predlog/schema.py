"""The prediction log's SQL: its tables and the statements that write and read them,
the same on SQLite and PostgreSQL (`?` placeholders; serving/predlog/store.py turns
them into PostgreSQL's). serving/predlog/store.py describes the tables."""

from __future__ import annotations

import re

SEALED = "hmac-sha256:"  # how `text_sha256` starts in an encrypted row (crypto.py)
# A literal, not a parameter: the query planners use the partial index below only for
# the very expression it was made with.
IS_SEALED = f"text_sha256 LIKE '{SEALED}%'"

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
    # A challenger's answers in shadow mode (serving/engine/shadow.py), under the same
    # request id and position as the champion's row in `predictions`.
    """CREATE TABLE IF NOT EXISTS shadow_predictions (
        request_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        model_version TEXT NOT NULL,
        probabilities TEXT NOT NULL,
        label TEXT NOT NULL,
        PRIMARY KEY (request_id, position, model_version))""",
    # A canary its operational guards stopped (serving/engine/canary.py), and beside
    # which champion: the first server process to see it trip records why; every
    # worker and replica sharing the log then stops it too, and the controller rolls
    # it back (serving/predlog/canary_stops.py).
    """CREATE TABLE IF NOT EXISTS canary_stops (
        challenger_version TEXT NOT NULL PRIMARY KEY,
        champion_version TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        reason TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS predictions_created ON predictions (created)",
    "CREATE INDEX IF NOT EXISTS feedback_created ON feedback (created)",
    # The encrypted rows alone, by time (a partial index, empty while encryption is
    # off): the check at every start and connection (crypto.newest_sealed) finds the
    # newest, or that there is none, without reading every row of a plaintext log.
    f"CREATE INDEX IF NOT EXISTS predictions_sealed ON predictions (created) WHERE {IS_SEALED}",
)


def created_name(statement: str) -> str:
    """The table or index a SCHEMA statement creates."""
    return re.search(r"IF NOT EXISTS (\w+)", statement).group(1)


# A client reusing a request id replaces its earlier answer: the latest is the one a
# label sent afterwards refers to, and a label of the earlier answer goes with it.
FORGET_FEEDBACK = "DELETE FROM feedback WHERE request_id = ? AND position = ?"
FORGET_SHADOW = "DELETE FROM shadow_predictions WHERE request_id = ? AND position = ?"
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


INSERT_SHADOW = """
    INSERT INTO shadow_predictions (request_id, position, created, model_version,
                                    probabilities, label)
    VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (request_id, position, model_version) DO UPDATE SET
        created = excluded.created, probabilities = excluded.probabilities,
        label = excluded.label"""

ORPHAN_SHADOW = """
    DELETE FROM shadow_predictions WHERE NOT EXISTS (
        SELECT 1 FROM predictions p
        WHERE p.request_id = shadow_predictions.request_id
          AND p.position = shadow_predictions.position)"""

# The first stop of a challenger's canary is the one kept: it names what tripped first.
# A stop stands until a person clears it (CLEAR_CANARY_STOP): a fixed model is a new
# bundle version, but a trip caused by the machine is not the model's.
INSERT_CANARY_STOP = """
    INSERT INTO canary_stops (challenger_version, champion_version, created, reason)
    VALUES (?, ?, ?, ?) ON CONFLICT (challenger_version) DO NOTHING"""
CANARY_STOPPED = "SELECT reason FROM canary_stops WHERE challenger_version = ?"
# A person's call that a stop was not the model's fault (`textops clear-stop`).
CLEAR_CANARY_STOP = "DELETE FROM canary_stops WHERE challenger_version = ?"

# Labelled requests that the champion and a challenger both answered since `?` (unix
# seconds): the paired outcomes of shadow mode (pipeline/promotion/controller.py). The
# challenger scores a request after the champion answered it, so an answer of the
# challenger older than the champion's row belongs to an earlier request that reused
# the id, and is left out.
PAIRED_LABELS = """
    SELECT f.label, p.label, s.label
    FROM feedback f
    JOIN predictions p ON p.request_id = f.request_id AND p.position = f.position
    JOIN shadow_predictions s ON s.request_id = f.request_id AND s.position = f.position
    WHERE p.model_version = ? AND s.model_version = ? AND p.created >= ?
      AND s.created >= p.created
    ORDER BY f.created, f.request_id, f.position"""

# Canary mode: the labelled requests each model answered since `?` (the canary's
# start: both arms over the same weeks), and how many it got right.
CANARY_LABELS = """
    SELECT p.model_version, COUNT(*), SUM(CASE WHEN f.label = p.label THEN 1 ELSE 0 END)
    FROM feedback f JOIN predictions p
         ON p.request_id = f.request_id AND p.position = f.position
    WHERE p.model_version IN (?, ?) AND p.created >= ?
    GROUP BY p.model_version"""
