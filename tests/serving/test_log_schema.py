"""Opening a PostgreSQL prediction log that other replicas are writing to: a new
connection (a replica starting, a writer reconnecting, a label's own connection) must
not hold up or break the writers' transactions."""

from __future__ import annotations

import threading
import uuid

import psycopg2
import pytest

from serving.predlog.store import open_store


def mid_batch(url: str, request_id: str):
    """A writer's transaction half-way through a batch: a label stored, its answer's
    row not yet. The connection, with the transaction open."""
    connection = psycopg2.connect(url)
    connection.cursor().execute("INSERT INTO feedback (request_id, position, label, "
                                "created) VALUES (%s, 0, 'pos', 0)", (request_id,))
    return connection


@pytest.mark.slow
def test_opening_the_log_beside_a_writer_mid_batch_breaks_neither(postgres):
    log_url, request_id = postgres.url, uuid.uuid4().hex
    open_store(log_url).close()  # the log exists, as the first replica left it
    writer = mid_batch(log_url, request_id)
    opened, failed = threading.Event(), []

    def open_another():
        try:
            open_store(log_url).close()
            opened.set()
        except Exception as err:  # noqa: BLE001 - the test reports it
            failed.append(err)

    opening = threading.Thread(target=open_another)
    opening.start()
    try:
        # Before the fix the new connection's CREATE INDEX took the predictions table
        # and waited here for the writer's feedback; the writer's next insert would
        # then have waited on it, and PostgreSQL's deadlock detector failed one.
        assert opened.wait(10), failed
        writer.cursor().execute(
            "INSERT INTO predictions (request_id, position, created, model_version, text, "
            "text_sha256, probabilities, label) "
            "VALUES (%s, 0, 0, 'v1', 'text', 'hash', '[0.5, 0.5]', 'pos')", (request_id,))
        writer.commit()
    finally:
        writer.close()
        opening.join(30)
    assert not failed
    store = open_store(log_url)
    try:
        assert store.positions(request_id) == {0}
    finally:
        store.close()
