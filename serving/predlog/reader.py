"""What the pipeline reads from the prediction log: the labelled predictions.

`make retrain` and the feedback snapshot (pipeline/) call `read_labelled(url)`. It
opens the log read-only (`create=False`: a read-only database role is enough) and
imports only the store, not the service's writer.
"""

from __future__ import annotations

from serving.predlog.store import open_store


def read_labelled(url: str, since: float | None = None) -> list[dict]:
    """Every labelled prediction (labelled after `since`, unix seconds, if given), in
    the order the labels came: {request_id, position, text, text_sha256, label (the
    feedback's), predicted (the service's), model_version, created (of the label)}."""
    store = open_store(url, create=False)
    try:
        return store.labelled(since)
    finally:
        store.close()
