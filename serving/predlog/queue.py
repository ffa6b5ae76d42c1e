"""The label queue (active learning): the logged answers most worth a label.

A label teaches most where the model was least sure. Among the newest `scan`
answers that have no label yet, the queue ranks by
- `margin` (default): the top probability minus the runner-up's, smallest first
  (Scheffer et al. 2001): the answers a small change would flip;
- `entropy`: the entropy of the answer's distribution, largest first: unsure across
  every class (Shannon; Settles 2009's survey compares both).
A classifier's answer is its class probabilities; a next-word answer, the
probabilities of the words it suggested (`/generate` continuations carry none and
are left out). Texts are decrypted with the log's keys, as `make retrain` reads
them. `GET /label-queue` serves it; `textops label-queue` writes it as Label Studio
tasks (serving/predlog/label_studio.py).

While a challenger runs in shadow mode, the answers it labelled otherwise than the
logged model come first: only there can a label favour one of the two, and those
discordant pairs are the evidence promotion waits for (pipeline/promotion/
controller.py). Among them the order is a fixed shuffle (a hash of the request id and
position), not the strategy's: the champion is most often wrong where its margin is
smallest, so disagreements picked by margin would be labelled mostly in the
challenger's favour, and the sequential test would promote a challenger no better
than the champion (tests/serving/test_label_queue.py simulates it). Drawn at random,
a disagreement is as likely to favour either model when the two are equally
accurate, and the test keeps its error rate. The rest follow in the strategy's order.
Only the given challenger's rows count, so the rows a retired challenger left behind
do not reorder the queue.
"""

from __future__ import annotations

import hashlib
import math

import orjson

from serving.predlog.crypto import LogCipher, opened
from serving.predlog.store import open_store

STRATEGIES = ("margin", "entropy")

# The challenger's answer beside each: its version is the first parameter (NULL, with
# no challenger, matches no row). As in schema.PAIRED_LABELS, a challenger's answer
# older than the logged one belongs to an earlier request that reused the id.
UNLABELLED = """SELECT p.request_id, p.position, p.created, p.model_version, p.text,
    p.text_sha256, p.probabilities, p.label, s.label
    FROM predictions p
    LEFT JOIN feedback f ON f.request_id = p.request_id AND f.position = p.position
    LEFT JOIN shadow_predictions s
      ON s.request_id = p.request_id AND s.position = p.position
     AND s.model_version = ? AND s.created >= p.created
    WHERE f.request_id IS NULL
    ORDER BY p.created DESC
    LIMIT ?"""


def distribution(probabilities: str) -> list[float] | None:
    """The probabilities a logged answer gave, largest first; None when it has none
    (a /generate continuation)."""
    value = orjson.loads(probabilities)
    if isinstance(value, dict):
        value = [p for _, p in value.get("next_words") or []]
    return sorted((float(p) for p in value), reverse=True) or None


def shuffled(request_id: str, position: int) -> int:
    """A place in a fixed random order: independent of what either model answered."""
    return int.from_bytes(hashlib.blake2b(f"{request_id}:{position}".encode(),
                                          digest_size=8).digest(), "big")


def margin(ps: list[float]) -> float:
    return ps[0] - (ps[1] if len(ps) > 1 else 0.0)


def entropy(ps: list[float]) -> float:
    """In nats. A next-word answer lists its top words only: the probability left over
    counts as one more outcome, so its entropy is a lower bound."""
    rest = 1.0 - sum(ps)
    return -sum(p * math.log(p) for p in (*ps, rest) if p > 1e-9)


def label_queue(url: str, cipher: LogCipher | None, budget: int, strategy: str = "margin",
                scan: int = 10_000, challenger: str | None = None) -> list[dict]:
    """Up to `budget` unlabelled answers among the newest `scan`, most worth a label
    first: {request_id, position, text, predicted, probabilities (largest first),
    margin, entropy, model_version, created, challenger, disagreed}. `challenger`: the
    version of the challenger in shadow mode, whose disagreements come first; an
    item's `challenger` is its answer, {model_version, label}, or None where it gave
    none (no challenger, or it has not scored the request, or dropped it)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    store = open_store(url, create=False)
    try:
        rows = store.rows(UNLABELLED, (challenger, scan))
    finally:
        store.close()
    keys = ("request_id", "position", "created", "model_version", "text", "text_sha256",
            "probabilities", "label", "challenger_label")
    candidates = []
    for row in rows:
        item = dict(zip(keys, row, strict=True))
        ps = distribution(item["probabilities"])
        if ps is None:
            continue
        other = item.pop("challenger_label")
        candidates.append({"request_id": item["request_id"], "position": item["position"],
                           "row": item, "predicted": item["label"], "probabilities": ps,
                           "margin": margin(ps), "entropy": entropy(ps),
                           "model_version": item["model_version"],
                           "created": item["created"],
                           "challenger": None if other is None else
                           {"model_version": challenger, "label": other},
                           "disagreed": other is not None and other != item["label"]})
    def order(c: dict) -> tuple:
        if c["disagreed"]:  # a fixed shuffle, never by the models' own scores
            return 0, shuffled(c["request_id"], c["position"])
        return 1, c["margin"] if strategy == "margin" else -c["entropy"], -c["created"]

    candidates.sort(key=order)
    chosen = candidates[:budget]
    for item in chosen:  # only what is sent is decrypted
        item["text"] = opened(item.pop("row"), cipher)["text"]
    return chosen
