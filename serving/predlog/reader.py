"""What the pipeline reads from the prediction log: the labelled predictions.

`make retrain` and the feedback snapshot (pipeline/) call `read_labelled(url)`. It
opens the log read-only (`create=False`: a read-only database role is enough) and
imports only the store and the log's cipher, not the service's writer. Encrypted
texts are decrypted with the keys the service's own settings name
(TEXTOPS_PREDICTION_LOG_KEYS or TEXTOPS_PREDICTION_LOG_KEY_FILE, serving/predlog/crypto.py).
"""

from __future__ import annotations

from serving.predlog.crypto import LogCipher, cipher_from_env, opened
from serving.predlog.store import open_store


def read_labelled(url: str, since: float | None = None,
                  cipher: LogCipher | None = None) -> list[dict]:
    """Every labelled prediction (labelled after `since`, unix seconds, if given), in
    the order the labels came: {request_id, position, text, text_sha256, label (the
    feedback's), predicted (the service's), model_version, created (of the label)}.

    `text` is plaintext and `text_sha256` its sha256, encrypted or not in the log,
    decrypted with `cipher` (default: the keys of the environment's settings); an
    encrypted row and no key that opens it is a PredictionLogKeyError naming them."""
    cipher = cipher or cipher_from_env()
    store = open_store(url, create=False)
    try:
        rows = store.labelled(since)
    finally:
        store.close()
    return [opened(row, cipher) for row in rows]
