"""Encryption at rest of what users sent: the keys, the cipher, and the log's check.

The prediction log keeps each answered text (normalised and masked, or an image's
sha256 or thumbnail) in `predictions.text`. With keys configured, the writer stores
it as a Fernet token instead, and `text_sha256` as `hmac-sha256:<hex>`, a keyed hash:
a plain sha256 of a short text is reversed by hashing guesses. That prefix is also how
a row says it is encrypted (the column is never user input), so a log whose older
rows predate the keys still reads. The reader (serving/predlog/reader.py) decrypts
with the same keys, read from the same settings by this module.

Fernet (AES-128-CBC and HMAC-SHA256, from `cryptography`) rather than AES-GCM: it is
authenticated, its tokens are ASCII (a TEXT column on SQLite and PostgreSQL alike),
and MultiFernet is rotation ready-made (encrypt under the first key, decrypt under
any), with no nonces or key ids of ours to get wrong. It costs about 9 us a row, in
the writer's thread, off the request path.

Keys (newest first), from one of
    TEXTOPS_PREDICTION_LOG_KEYS       comma-separated
    TEXTOPS_PREDICTION_LOG_KEY_FILE   one a line, `#` comments (a mounted secret)
A key that does not parse, a key file that cannot be read, and a log that holds
encrypted rows while no key (or no right key) is given stop the service at its start
(`check_log`) and the export, naming the setting; nothing is written in plaintext
while keys are given. A log with no encrypted row yet cannot tell that keys are
missing: `TEXTOPS_REQUIRE_LOG_ENCRYPTION` (serving/settings.py) refuses to start a
service with a log and no keys. Rotation: put a new key first, keep the old ones
after it, restart the service, run `rotate` (every row re-encrypted under the newest
key, none lost), then drop the old keys.

    python -m serving.predlog.crypto new-key
    python -m serving.predlog.crypto rotate [--log URL]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import logging
import os
import sys
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from serving.predlog.schema import IS_SEALED, SEALED
from serving.predlog.store import (
    LogStore,
    PredictionLogError,
    open_store,
    redacted,
    sqlite_path,
)

log = logging.getLogger("serving.prediction_log")

KEYS_ENV = "TEXTOPS_PREDICTION_LOG_KEYS"
KEY_FILE_ENV = "TEXTOPS_PREDICTION_LOG_KEY_FILE"
EITHER = f"{KEYS_ENV} or {KEY_FILE_ENV}"
NEW_KEY = "`python -m serving.predlog.crypto new-key` makes one"


class PredictionLogKeyError(PredictionLogError):
    """Keys that cannot be used, or a log they cannot open; the message names the
    setting (never a key)."""


def load_keys(keys: str | None, key_file: str | None) -> tuple[list[bytes], str]:
    """The keys of one of the two settings, newest first, and the setting's name;
    no keys: encryption off."""
    if keys and keys.strip() and key_file:
        raise PredictionLogKeyError(f"set {KEYS_ENV} or {KEY_FILE_ENV}, not both")
    if key_file:
        try:
            text = Path(key_file).read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise PredictionLogKeyError(f"{KEY_FILE_ENV}={key_file!r}: cannot read it "
                                        f"({getattr(err, 'strerror', None) or err})") from None
        entries = [line.strip() for line in text.splitlines()
                   if line.strip() and not line.strip().startswith("#")]
        if not entries:
            raise PredictionLogKeyError(f"{KEY_FILE_ENV}={key_file!r}: no key in it")
        source = KEY_FILE_ENV
    else:
        entries = [key.strip() for key in (keys or "").split(",") if key.strip()]
        source = KEYS_ENV
    for number, entry in enumerate(entries, 1):
        try:
            Fernet(entry)
        except ValueError:  # named by position: the message must not carry the secret
            raise PredictionLogKeyError(
                f"{source}: key {number} is not a Fernet key (32 url-safe base64-encoded "
                f"bytes; {NEW_KEY})") from None
    return [entry.encode() for entry in entries], source


class LogCipher:
    """Seals the logged texts under the newest key and opens them under any."""

    def __init__(self, keys: list[bytes], source: str = KEYS_ENV):
        self.fernet = MultiFernet([Fernet(key) for key in keys])
        self.source = source  # the setting the keys came from, for messages
        # The keyed hash gets a key of its own, derived from the newest key: one
        # secret to manage, and a hash that reveals nothing about the cipher's key.
        self.digest_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                               info=b"textops prediction log text digest"
                               ).derive(base64.urlsafe_b64decode(keys[0]))

    def seal(self, text: str) -> str:
        return self.fernet.encrypt(text.encode()).decode("ascii")

    def digest(self, text: str) -> str:
        return SEALED + hmac.new(self.digest_key, text.encode(), hashlib.sha256).hexdigest()

    def open(self, token: str, where: str = "a text of the prediction log") -> str:
        try:
            return self.fernet.decrypt(token.encode("ascii")).decode()
        except (InvalidToken, UnicodeError):
            pass  # raised outside: the writer's log line names an error's context first
        raise PredictionLogKeyError(f"{where} cannot be decrypted with the keys in "
                                    f"{self.source}: the key it was written under is not "
                                    "among them")


def cipher_from(keys: str | None, key_file: str | None) -> LogCipher | None:
    found, source = load_keys(keys, key_file)
    return LogCipher(found, source) if found else None


def cipher_from_env(environ=os.environ) -> LogCipher | None:
    """The cipher of the service's own settings, for the pipeline's export and this
    module's commands, which run without the service's Settings."""
    return cipher_from(environ.get(KEYS_ENV), environ.get(KEY_FILE_ENV))


def is_sealed(digest: str) -> bool:
    return digest.startswith(SEALED)


def opened(row: dict, cipher: LogCipher | None) -> dict:
    """A row of `LogStore.labelled` as it was before sealing: the text, its sha256."""
    if not is_sealed(row["text_sha256"]):
        return row  # written before encryption was on
    where = f"the text of request {row['request_id']!r} position {row['position']}"
    if cipher is None:
        raise PredictionLogKeyError(f"{where} is encrypted and no key is set: set {EITHER} "
                                    "to the log's keys")
    text = cipher.open(row["text"], where)
    return {**row, "text": text, "text_sha256": hashlib.sha256(text.encode()).hexdigest()}


# ---------------------------------------------------------------- the log's check


def newest_sealed(store: LogStore) -> tuple | None:
    # no parameters: the literal `%` of IS_SEALED stays as it is for psycopg2 too
    cursor = store.connection.cursor()
    cursor.execute("SELECT request_id, position, text FROM predictions WHERE "  # noqa: S608
                   f"{IS_SEALED} ORDER BY created DESC LIMIT 1")
    return cursor.fetchone()


def check_store(store: LogStore, cipher: LogCipher | None) -> None:
    """PredictionLogKeyError unless `cipher` opens the log's newest encrypted row (no
    encrypted rows: any cipher, or none): the service's start and the writer's every
    connection, so that a log is never continued in plaintext, or under a stray key."""
    with store.connection:
        row = newest_sealed(store)
    if row is None:
        return
    where = f"the prediction log {redacted(store.url)}"
    if cipher is None:
        raise PredictionLogKeyError(f"{where} holds encrypted texts and no key is set: "
                                    f"set {EITHER} to its keys")
    cipher.open(row[2], f"the newest encrypted text of {where}")


def check_log(url: str, cipher: LogCipher | None) -> None:
    """At the service's start: `check_store` on the log at `url`, if it can be read now.
    A log that is not there yet, or a database that is down, is the writer's to check
    when it connects: a slow database must not stop the service."""
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        return
    try:
        store = open_store(url, create=False)
    except Exception as err:  # noqa: BLE001 - any database's connection error
        log.warning("prediction log %s: not checked at start (%s); the writer checks it "
                    "when it connects", redacted(url), err)
        return
    try:
        try:
            check_store(store, cipher)
        except PredictionLogKeyError:
            raise
        except Exception:  # noqa: BLE001, S110 - no tables yet: nothing to check
            return
        if cipher is not None and has_plaintext(store):
            log.warning("prediction log %s holds texts written before encryption was on, "
                        "in plaintext: `python -m serving.predlog.crypto rotate` encrypts "
                        "them", redacted(url))
    finally:
        store.close()


def has_plaintext(store: LogStore) -> bool:
    with store.connection:
        cursor = store.connection.cursor()
        cursor.execute(store._sql("SELECT 1 FROM predictions WHERE text_sha256 NOT LIKE ? "
                                  "LIMIT 1"), (SEALED + "%",))
        return cursor.fetchone() is not None


# ---------------------------------------------------------------- rotation


def rotate(url: str, cipher: LogCipher, batch: int = 1000) -> dict:
    """Re-encrypt every row under `cipher`'s newest key (plaintext rows included), a
    batch per transaction, in key order. A row is decrypted before it is rewritten, so
    one no key opens stops the rotation with it untouched; a row the service rewrote
    meanwhile (a reused request id) is left as the service wrote it."""
    store = open_store(url, create=False)
    select = store._sql("SELECT request_id, position, text, text_sha256 FROM predictions "
                        "WHERE (request_id, position) > (?, ?) "
                        "ORDER BY request_id, position LIMIT ?")
    update = store._sql("UPDATE predictions SET text = ?, text_sha256 = ? "
                        "WHERE request_id = ? AND position = ? AND text = ?")
    done = {"rows": 0, "were_plaintext": 0}
    after: tuple = ("", -1)
    try:
        while True:
            with store.connection:
                cursor = store.connection.cursor()
                cursor.execute(select, (*after, batch))
                rows = cursor.fetchall()
                if not rows:
                    return done
                changes = []
                for request_id, position, text, digest in rows:
                    where = f"the text of request {request_id!r} position {position}"
                    plain = cipher.open(text, where) if is_sealed(digest) else text
                    done["were_plaintext"] += not is_sealed(digest)
                    changes.append((cipher.seal(plain), cipher.digest(plain), request_id,
                                    position, text))
                store._executemany(cursor, update, changes)
            done["rows"] += len(rows)
            after = tuple(rows[-1][:2])
    finally:
        store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.predlog.crypto")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("new-key", help="print a new key")
    rotating = commands.add_parser("rotate", help=f"re-encrypt every row under the first "
                                   f"key of {EITHER}")
    rotating.add_argument("--log", default=os.environ.get("TEXTOPS_PREDICTION_LOG"),
                          help="the log's URL (default: TEXTOPS_PREDICTION_LOG)")
    args = parser.parse_args(argv)
    if args.command == "new-key":
        print(Fernet.generate_key().decode())
        return
    if not args.log:
        sys.exit("rotate: no log: give --log or set TEXTOPS_PREDICTION_LOG")
    try:
        cipher = cipher_from_env()
        if cipher is None:
            sys.exit(f"rotate: no keys: set {EITHER}, the new key first")
        done = rotate(args.log, cipher)
    except PredictionLogError as err:
        sys.exit(f"rotate: {err}")
    print(f"rotate: {done['rows']} rows of {redacted(args.log)} encrypted under the first "
          f"key of {cipher.source} ({done['were_plaintext']} were plaintext)")


if __name__ == "__main__":
    main()
