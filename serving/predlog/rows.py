"""Which answers the prediction log keeps, and the rows it stores for each.

`sampled` decides per request id (the same way in every replica); `prediction_rows`
turns one answered request (a classifier's probabilities, or a next-word model's top
words or continuation) into its `predictions` rows (serving/predlog/store.py has
the schema), its texts normalised by serving/predlog/normalizer.py and, with the log's
keys set, encrypted by serving/predlog/crypto.py; `shadow_rows` turns a challenger's
answers (shadow mode) into their `shadow_predictions` rows.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from serving.predlog.normalizer import normalize_texts, normalizer_state

# A next-word model's answer to one text, as logged: the word it put first (what the
# word typed next is compared with; "" when it had none) and what it answered, e.g.
# {"next_words": [[word, probability], ...]} or {"completion": ..., "finish_reason": ...}.
NextWordAnswer = tuple[str, dict]

if TYPE_CHECKING:
    import numpy as np

    from serving.bundle import Bundle
    from serving.predlog.crypto import LogCipher


class ShadowAnswers(NamedTuple):
    """A challenger's answers to logged requests, a batch of its worker's at a time
    (shadow mode, serving/engine/shadow.py); `shadow_rows` turns them into rows."""

    created: float
    bundle: Any  # a Bundle
    requests: list[tuple[str, int]]  # (request_id, how many texts), in the answers' order
    probs: Any  # the answers to all their texts: [texts, classes], or next-word answers


def sampled(request_id: str, rate: float) -> bool:
    """Whether `request_id` is logged at sampling `rate`: a hash of the id decides, so
    every text of a request is logged or none, the same way in every replica."""
    if rate >= 1:
        return True
    if rate <= 0:
        return False
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < rate * 2**64


def answers(bundle: Bundle, probs: np.ndarray | list[NextWordAnswer]) -> list[tuple[str, str]]:
    """Each text's (label, probabilities column): a classifier's predicted class and
    every class probability; a next-word model's top word and what it answered."""
    if getattr(bundle, "decoder", None) is not None:
        return [(label, orjson.dumps(answer).decode()) for label, answer in probs]
    names = bundle.label_names
    # the first of ties, as /predict
    return [(names[row.index(max(row))], orjson.dumps(row).decode()) for row in probs.tolist()]


def next_word_answers(rows: list[list[tuple[str, float]]]) -> list[NextWordAnswer]:
    """A next-word model's top words for each text (a /predict or V2 answer, the
    champion's or a challenger's in shadow mode) as logged: its top word and
    {"next_words": [[word, probability], ...]}."""
    return [(row[0][0] if row else "", {"next_words": [[word, p] for word, p in row]})
            for row in rows]


def shadow_rows(answered: ShadowAnswers) -> list[tuple]:
    """A challenger's answers (shadow mode), request by request and position by
    position, beside the champion's rows: no text, which the champion's row holds."""
    created, version = answered.created, answered.bundle.version
    each = iter(answers(answered.bundle, answered.probs))
    return [(request_id, position, created, version, answer, label)
            for request_id, items in answered.requests
            for position, (label, answer) in zip(range(items), each, strict=False)]


def prediction_rows(request_id: str, created: float, bundle: Bundle, texts: list[str],
                    probs: np.ndarray | list[NextWordAnswer],
                    normalized: list[str] | None = None,
                    cipher: LogCipher | None = None) -> list[tuple]:
    """The predictions rows of one request, its texts normalised and masked by the
    bundle's own tokenizer normalizer, as training saw them (`normalized`: already
    done, by `normalize_texts`); with a `cipher`, each text encrypted and its hash
    keyed. `probs`: a classifier's probabilities [n, classes], or a next-word model's
    answers (`NextWordAnswer` each)."""
    if normalized is None:
        normalized = normalize_texts(normalizer_state(bundle), texts)
    version = bundle.version
    rows = []
    for position, (stored, (label, answer)) in enumerate(
            zip(normalized, answers(bundle, probs), strict=True)):
        if cipher is None:
            text, digest = stored, hashlib.sha256(stored.encode()).hexdigest()
        else:
            text, digest = cipher.seal(stored), cipher.digest(stored)
        rows.append((request_id, position, created, version, text, digest, answer, label))
    return rows
