"""Encryption at rest of the prediction log (serving/predlog/crypto.py): a real service
with a key leaves no plaintext in the database's bytes and still takes feedback; the
export decrypts with the key and names the setting without it; a service refuses to
start on an encrypted log with no key or a wrong one; rotation keeps every row; the
writer never continues an encrypted log in plaintext; on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from conftest import ROOT, eventually, running_service
from cryptography.fernet import Fernet
from tokenizers import normalizers

from pipeline.data import feedback
from serving.monitoring.metrics import ServiceMetrics
from serving.predlog.crypto import (
    KEY_FILE_ENV,
    KEYS_ENV,
    LogCipher,
    PredictionLogKeyError,
    load_keys,
    rotate,
)
from serving.predlog.reader import read_labelled
from serving.predlog.rows import prediction_rows
from serving.predlog.store import open_store
from serving.predlog.writer import PredictionLog

NAMES = ["neg", "pos"]
# Distinctive words: found anywhere in the database's bytes only as plaintext.
SECRETS = ["zanzibar quokka marmalade film", "a dreadful xylophone plot",
           "the periwinkle narwhal was lovely"]
OLD, NEW = Fernet.generate_key(), Fernet.generate_key()


def bundle(version: str = "v1"):
    from types import SimpleNamespace

    return SimpleNamespace(tokenizer=SimpleNamespace(normalizer=normalizers.Lowercase()),
                           label_names=NAMES, version=version)


def write(url: str, cipher: LogCipher | None, request_id: str, texts: list[str],
          labelled_at: float) -> None:
    """Log one answered request now (as the writer would: within retention) and label
    every text of it at `labelled_at`."""
    probs = np.array([[0.9, 0.1]] * len(texts), dtype=np.float32)
    store = open_store(url)
    try:
        store.write_predictions(prediction_rows(request_id, time.time(), bundle(), texts,
                                                probs, cipher=cipher))
        assert store.record_feedback([(request_id, i, "pos") for i in range(len(texts))],
                                     labelled_at) == []
    finally:
        store.close()


def texts_of(url: str, cipher: LogCipher | None) -> dict[tuple[str, int], str]:
    return {(r["request_id"], r["position"]): r["text"] for r in read_labelled(url, cipher=cipher)}


def raw_rows(url: str) -> list[tuple]:
    store = open_store(url)
    try:
        cursor = store.connection.cursor()
        cursor.execute("SELECT request_id, position, text, text_sha256 FROM predictions "
                       "ORDER BY request_id, position")
        return cursor.fetchall()
    finally:
        store.close()


@pytest.fixture(autouse=True)
def _no_keys_from_outside(monkeypatch):
    monkeypatch.delenv(KEYS_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)


# ---------------------------------------------------------------- keys and rows


def test_keys_come_from_one_setting_and_a_bad_one_is_named_not_shown(tmp_path, monkeypatch):
    assert load_keys(f" {NEW.decode()} , {OLD.decode()} ", None) == ([NEW, OLD], KEYS_ENV)
    assert load_keys(None, None) == ([], KEYS_ENV)  # no keys: encryption off
    secret = tmp_path / "keys"
    secret.write_text(f"# newest first\n{NEW.decode()}\n\n{OLD.decode()}\n")
    assert load_keys(None, str(secret)) == ([NEW, OLD], KEY_FILE_ENV)
    with pytest.raises(PredictionLogKeyError, match=f"{KEY_FILE_ENV}=.*: cannot read it"):
        load_keys(None, str(tmp_path / "missing"))
    with pytest.raises(PredictionLogKeyError, match="not both"):
        load_keys(NEW.decode(), str(secret))
    bad = "not-a-key-but-a-secret-all-the-same"
    with pytest.raises(PredictionLogKeyError, match=f"{KEYS_ENV}: key 2 is not a Fernet key"
                       ) as raised:
        load_keys(f"{NEW.decode()},{bad}", None)
    assert bad not in str(raised.value)

    from serving.settings import Settings, SettingsError

    monkeypatch.setenv(KEYS_ENV, bad)
    with pytest.raises(SettingsError, match=f"{KEYS_ENV}: key 1 is not a Fernet key") as raised:
        Settings.from_env()
    assert bad not in str(raised.value)
    monkeypatch.setenv(KEYS_ENV, NEW.decode())
    assert NEW.decode() not in repr(Settings.from_env())
    assert Settings.from_env().log_cipher() is not None


def test_sealed_rows_hold_a_token_and_a_keyed_hash():
    cipher = LogCipher([NEW])
    thumbnail = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklE"
    probs = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)
    rows = prediction_rows("r", 1.0, bundle(), [SECRETS[0], thumbnail], probs, cipher=cipher)
    for row, plain in zip(rows, [SECRETS[0], thumbnail.lower()], strict=True):
        assert plain not in row[4] and row[4].isascii()
        assert cipher.open(row[4]) == plain
        assert row[5].startswith("hmac-sha256:")
        assert hashlib.sha256(plain.encode()).hexdigest() not in row[5]
    # the same text, the same keyed hash (the column still tells equal texts apart)
    again = prediction_rows("s", 2.0, bundle(), [SECRETS[0]], probs[:1], cipher=cipher)
    assert again[0][5] == rows[0][5] and again[0][4] != rows[0][4]


def test_reading_decrypts_with_the_key_and_names_the_setting_without_it(log_url):
    write(log_url, None, "plain", ["before the keys"], 10.0)  # from before encryption
    write(log_url, LogCipher([NEW]), "sealed", SECRETS[:2], 11.0)
    labelled = read_labelled(log_url, cipher=LogCipher([NEW]))
    assert [r["text"] for r in labelled] == ["before the keys", *SECRETS[:2]]
    # the reader hands on the plaintext's own sha256, encrypted in the log or not
    assert all(r["text_sha256"] == hashlib.sha256(r["text"].encode()).hexdigest()
               for r in labelled)
    with pytest.raises(PredictionLogKeyError, match=f"is encrypted and no key is set: set "
                                                    f"{KEYS_ENV} or {KEY_FILE_ENV}"):
        read_labelled(log_url)
    with pytest.raises(PredictionLogKeyError, match=f"cannot be decrypted with the keys in "
                                                    f"{KEYS_ENV}"):
        read_labelled(log_url, cipher=LogCipher([OLD]))


def test_rotation_keeps_every_row_readable_under_the_new_key_alone(log_url):
    write(log_url, None, "a-plain", ["written before the keys"], 10.0)
    write(log_url, LogCipher([OLD]), "b-old", SECRETS, 11.0)
    before = texts_of(log_url, LogCipher([OLD]))
    # a key list without the old key stops at the first row it cannot open, unchanged
    with pytest.raises(PredictionLogKeyError, match="request 'b-old' position 0"):
        rotate(log_url, LogCipher([NEW]), batch=2)
    assert texts_of(log_url, LogCipher([NEW, OLD])) == before
    done = rotate(log_url, LogCipher([NEW, OLD]), batch=2)  # batches across requests
    assert done == {"rows": 4, "were_plaintext": 1}
    assert texts_of(log_url, LogCipher([NEW])) == before  # the old key is not needed
    assert all(digest.startswith("hmac-sha256:") for *_, digest in raw_rows(log_url))
    with pytest.raises(PredictionLogKeyError):
        read_labelled(log_url, cipher=LogCipher([OLD]))


def test_rotate_command(tmp_path):
    url = f"sqlite:///{tmp_path}/log.db"
    write(url, LogCipher([OLD]), "r", SECRETS, 10.0)
    env = {**os.environ, KEYS_ENV: f"{NEW.decode()},{OLD.decode()}"}
    done = subprocess.run([sys.executable, "-m", "serving.predlog.crypto", "rotate", "--log",
                           url], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "3 rows" in done.stdout and NEW.decode() not in done.stdout
    assert list(texts_of(url, LogCipher([NEW])).values()) == SECRETS
    key = subprocess.run([sys.executable, "-m", "serving.predlog.crypto", "new-key"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert load_keys(key.stdout.strip(), None)[0] == [key.stdout.strip().encode()]


def test_the_writer_never_continues_an_encrypted_log_in_plaintext(tmp_path):
    url = f"sqlite:///{tmp_path}/log.db"
    write(url, LogCipher([OLD]), "sealed", SECRETS[:1], 10.0)
    probs = np.array([[0.9, 0.1]], dtype=np.float32)
    for cipher in (None, LogCipher([NEW])):  # no key; a key that is not the log's
        metrics = ServiceMetrics(10)
        writer = PredictionLog(url, metrics, linger_s=0.01, cipher=cipher)
        writer.start()
        writer.record("later", bundle(), [SECRETS[1]], probs)
        assert writer.flush(timeout=60)
        writer.close(timeout=60)
        assert metrics.registry.get_sample_value("textops_prediction_log_dropped_total",
                                                 {"reason": "error"}) == 1
        assert [row[0] for row in raw_rows(url)] == ["sealed"]
    writer = PredictionLog(url, ServiceMetrics(10), linger_s=0.01, cipher=LogCipher([NEW, OLD]))
    writer.start()
    writer.record("later", bundle(), [SECRETS[1]], probs)
    assert writer.flush(timeout=60)
    writer.close(timeout=60)
    assert [row[0] for row in raw_rows(url)] == ["later", "sealed"]
    assert LogCipher([NEW]).open(raw_rows(url)[0][2]) == SECRETS[1]  # under the newest


# ---------------------------------------------------------------- the service


def predict(url: str, texts: list[str]) -> dict:
    response = httpx.post(f"{url}/predict", json={"texts": texts}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_service_with_a_key_stores_no_plaintext_and_the_export_decrypts(
        built_bundle, tmp_path, monkeypatch):
    secret = tmp_path / "secret" / "keys"  # as a Kubernetes secret is mounted
    secret.parent.mkdir()
    secret.write_text(NEW.decode() + "\n")
    url = f"sqlite:///{tmp_path}/log.db"
    with running_service(built_bundle[0], tmp_path, prediction_log=url,
                         prediction_log_key_file=secret) as service:
        answer = predict(service.url, SECRETS)
        labels = [{"request_id": answer["request_id"], "position": i, "label": "pos"}
                  for i in range(len(SECRETS))]
        sent = httpx.post(f"{service.url}/feedback", json=labels, timeout=30)
        assert sent.json() == {"accepted": 3}, sent.text
        eventually(lambda: metric_value(service.url, "textops_live_labels") == 3)
        # the database's files as they are on disk, its write-ahead log included
        stored = b"".join(path.read_bytes() for path in tmp_path.glob("log.db*"))
    stored += b"".join(path.read_bytes() for path in tmp_path.glob("log.db*"))  # checkpointed
    monkeypatch.setenv(KEYS_ENV, NEW.decode())  # the export reads the same settings
    out = tmp_path / "labelled.jsonl"
    assert feedback.export(url, out)["rows"] == 3
    exported = feedback.read_snapshot(out)
    assert [r["text"] for r in exported] == [text.lower() for text in SECRETS]
    distinctive = [word for row in exported for word in row["text"].split() if len(word) >= 7]
    assert len(distinctive) >= 6
    for plain in distinctive + [row[key] for row in exported for key in ("text", "text_sha256")]:
        assert plain.encode() not in stored, plain
    assert b"hmac-sha256:" in stored  # what the log holds instead
    monkeypatch.delenv(KEYS_ENV)
    refused = subprocess.run([sys.executable, "-m", "pipeline.data.feedback", "export",
                              "--log", url, "--out", str(tmp_path / "other.jsonl")],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert refused.returncode != 0
    assert f"set {KEYS_ENV} or {KEY_FILE_ENV}" in refused.stderr, refused.stderr
    assert not (tmp_path / "other.jsonl").exists()


def metric_value(url: str, name: str) -> float | None:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


@pytest.mark.parametrize("keys, words", [
    ({}, f"holds encrypted texts and no key is set: set {KEYS_ENV} or {KEY_FILE_ENV}"),
    ({"prediction_log_keys": NEW.decode()}, f"cannot be decrypted with the keys in {KEYS_ENV}"),
])
def test_a_service_refuses_to_start_on_an_encrypted_log_it_cannot_open(
        built_bundle, tmp_path, keys, words):
    url = f"sqlite:///{tmp_path}/log.db"
    write(url, LogCipher([OLD]), "sealed", SECRETS[:1], 10.0)
    with running_service(built_bundle[0], tmp_path, wait=False, prediction_log=url,
                         **keys) as service:
        code = service.process.wait(timeout=120)
    log = service.log_path.read_text()
    assert code != 0 and words in log, log[-3000:]
    assert NEW.decode() not in log
    assert [row[0] for row in raw_rows(url)] == ["sealed"]  # nothing written
