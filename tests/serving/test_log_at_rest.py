"""The prediction log at rest, beyond its encryption (test_log_encryption.py): a service
told to require encryption does not start without keys; deleted rows do not linger in
the SQLite file's free pages; the check every start makes of a log without encrypted
rows reads an (empty) index, not every row."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time

import numpy as np
from conftest import ROOT
from cryptography.fernet import Fernet
from tokenizers import normalizers

from serving.predlog import crypto, store
from serving.predlog.crypto import KEY_FILE_ENV, KEYS_ENV, LogCipher
from serving.predlog.rows import prediction_rows
from serving.predlog.store import open_store

REQUIRE = "TEXTOPS_REQUIRE_LOG_ENCRYPTION"
SECRET = "zanzibar quokka marmalade film"  # found in the file's bytes only as plaintext


def bundle():
    from types import SimpleNamespace

    return SimpleNamespace(tokenizer=SimpleNamespace(normalizer=normalizers.Lowercase()),
                           label_names=["neg", "pos"], version="v1")


def log_rows(url: str, request_id: str, created: float, cipher: LogCipher | None = None):
    log = open_store(url)
    try:
        log.write_predictions(prediction_rows(request_id, created, bundle(), [SECRET],
                                              np.array([[0.9, 0.1]], dtype=np.float32),
                                              cipher=cipher))
    finally:
        log.close()


def test_required_encryption_refuses_to_start_without_keys(tmp_path, monkeypatch):
    """A new (or plaintext) log has no encrypted row by which the start could tell that
    the keys are missing: TEXTOPS_REQUIRE_LOG_ENCRYPTION stops the service instead."""
    for name in (KEYS_ENV, KEY_FILE_ENV):
        monkeypatch.delenv(name, raising=False)
    env = {**os.environ, REQUIRE: "true", "TEXTOPS_PORT": "1",
           "TEXTOPS_HOST": "203.0.113.1",  # not this machine: were it to start, no bind
           "TEXTOPS_PREDICTION_LOG": f"sqlite:///{tmp_path}/log.db"}
    said = subprocess.run([sys.executable, "-m", "serving"], env=env, cwd=ROOT, timeout=60,
                          capture_output=True, text=True)
    assert said.returncode != 0 and "Traceback" not in said.stderr
    assert f"{REQUIRE} is on: set {KEYS_ENV} or {KEY_FILE_ENV}" in said.stderr, said.stderr
    assert not (tmp_path / "log.db").exists()  # nothing was written

    from serving.settings import Settings

    monkeypatch.setenv(REQUIRE, "true")
    monkeypatch.setenv(KEYS_ENV, Fernet.generate_key().decode())
    assert Settings.from_env().log_cipher() is not None  # with keys it starts
    monkeypatch.delenv(KEYS_ENV)
    monkeypatch.setenv("TEXTOPS_PREDICTION_LOG", "")
    assert Settings.from_env().log_cipher() is None  # no log: nothing to encrypt


def test_deleted_rows_are_zeroed_whatever_the_builds_default(tmp_path, monkeypatch):
    real_connect = sqlite3.connect

    def default_off(*args, **kwargs):  # a SQLite built without SQLITE_SECURE_DELETE
        connection = real_connect(*args, **kwargs)
        connection.execute("PRAGMA secure_delete=OFF")
        return connection

    monkeypatch.setattr(store.sqlite3, "connect", default_off)
    url = f"sqlite:///{tmp_path}/log.db"
    log_rows(url, "old", created=1.0)
    log = open_store(url)
    try:
        assert log.connection.execute("PRAGMA secure_delete").fetchone() == (1,)
        assert log.prune(now=time.time(), max_age_s=3600, max_rows=10) == 1
    finally:
        log.close()  # the last connection: the write-ahead log is checkpointed, removed
    stored = b"".join(path.read_bytes() for path in tmp_path.glob("log.db*"))
    assert SECRET.encode() not in stored


def test_the_check_of_a_plaintext_log_reads_an_index_not_every_row(tmp_path):
    url = f"sqlite:///{tmp_path}/log.db"
    log_rows(url, "plain", created=1.0)
    log = open_store(url, create=False)
    try:
        executed: list[str] = []
        log.connection.set_trace_callback(executed.append)
        assert crypto.newest_sealed(log) is None
        (query,) = [sql for sql in executed if sql.startswith("SELECT")]
        plan = log.connection.execute(f"EXPLAIN QUERY PLAN {query}").fetchall()
        assert "USING INDEX predictions_sealed" in plan[0][-1], plan
    finally:
        log.close()
    cipher = LogCipher([Fernet.generate_key()])
    log_rows(url, "sealed", created=2.0, cipher=cipher)
    log_rows(url, "later", created=3.0)
    log = open_store(url, create=False)
    try:  # still the newest encrypted row, with plaintext after it
        assert crypto.newest_sealed(log)[0] == "sealed"
    finally:
        log.close()
