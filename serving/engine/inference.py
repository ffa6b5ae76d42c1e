"""A model call on a batch of items, as the service's batcher, a shadow challenger's
worker and batch prediction all run it: a text classifier's texts in length groups
(short texts do not pay for long ones' padding), an image model's decoded pixels in
one call, a next-word model's top words per prompt. Each returns the answers in the
items' order and a `BatchStats` for the metrics.
"""

from __future__ import annotations

import time

import numpy as np

from serving.bundle import Bundle, softmax
from serving.bundle.images import brightness_contrast
from serving.monitoring.metrics import BatchStats


def length_groups(lengths: list[int], max_padding: float = 1.25) -> list[list[int]]:
    """Indices grouped by length: in each group, padded tokens (longest x count) stay
    within `max_padding` x the real tokens, so no group is mostly padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups, current, real = [], [], 0
    for i in order:
        longest = lengths[i]  # ascending: the newcomer is the longest
        if current and longest * (len(current) + 1) > max_padding * (real + longest):
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += longest
    if current:
        groups.append(current)
    return groups


def infer(bundle: Bundle, texts: list, top_k: int = 20) -> tuple[np.ndarray, BatchStats]:
    """Probabilities for texts, run as length groups; the rows come back in order. An
    image bundle's items (decoded uint8 pixels) run as one batch; a next-word bundle
    gives each text's `top_k` next words instead (`infer_next_words`)."""
    if bundle.task.items == "images":
        return infer_images(bundle, texts)
    if bundle.decoder is not None:
        return infer_next_words(bundle, texts, top_k)
    started = time.perf_counter()
    return infer_ids(bundle, bundle.encode(texts), started)


def infer_ids(bundle: Bundle, encoded: list[list[int]], started: float | None = None
              ) -> tuple[np.ndarray, BatchStats]:
    """A text classifier's probabilities for texts its tokenizer has encoded
    (`encoded`), run as length groups; the stats keep the ids (`BatchStats.encoded`),
    which a shadow challenger with the same tokenizer.json scores as they are."""
    started = time.perf_counter() if started is None else started
    lengths = [len(ids) for ids in encoded]
    probs = np.empty((len(encoded), len(bundle.label_names)), dtype=np.float32)
    groups = length_groups(lengths)
    padded = 0
    for group in groups:
        probs[group] = softmax(bundle.run([encoded[i] for i in group]))
        padded += max(lengths[i] for i in group) * len(group)
    unk = bundle.unk_id
    stats = BatchStats(texts=len(encoded), requests=1, groups=len(groups),
                       real_tokens=sum(lengths), padded_tokens=padded,
                       seconds=time.perf_counter() - started, lengths=lengths,
                       unknown=[ids.count(unk) for ids in encoded],
                       predicted=probs.argmax(axis=1).tolist(), bundle=bundle,
                       encoded=encoded)
    return probs, stats


def infer_next_words(bundle: Bundle, texts: list[str], k: int
                     ) -> tuple[list[list[tuple[str, float]]], BatchStats]:
    """Each text's k most probable next words and their probabilities: one prefill
    per length group (serving/bundle/decoding.py `Decoder.topk`), rows in order.
    A prompt over the model's context (the route refuses those; a reload to a shorter
    context may still slip one in) keeps its latest tokens."""
    started = time.perf_counter()
    decoder = bundle.decoder
    encoded = decoder.inputs.encode(texts)
    if decoder.max_len is not None:
        encoded = [ids[len(ids) - decoder.max_len + 1:] if len(ids) >= decoder.max_len
                   else ids for ids in encoded]
    lengths = [len(ids) + 1 for ids in encoded]  # the [EOS] each prompt follows
    rows: list = [None] * len(texts)
    surprisal: list = [None] * len(texts)
    groups = length_groups(lengths)
    for group in groups:
        best, measured = decoder.topk_surprisal([encoded[i] for i in group], k)
        for i, top, value in zip(group, best, measured, strict=True):
            rows[i] = [(word, p) for word, (_, p) in
                       zip(decoder.inputs.words([t for t, _ in top]), top, strict=True)]
            surprisal[i] = value
    # drift: the prompts' lengths and unknown words, and how surprising the model
    # found them (there are no classes to compare)
    stats = BatchStats(texts=len(texts), requests=1, groups=len(groups),
                       real_tokens=sum(lengths),
                       padded_tokens=sum(max(lengths[i] for i in g) * len(g) for g in groups),
                       seconds=time.perf_counter() - started,
                       lengths=[len(ids) for ids in encoded],
                       unknown=[ids.count(decoder.unk_id) for ids in encoded],
                       predicted=[], bundle=bundle,
                       features={"surprisal": [v for v in surprisal if v is not None]})
    return rows, stats


def infer_images(bundle: Bundle, images: list[np.ndarray]) -> tuple[np.ndarray, BatchStats]:
    """Probabilities for decoded images (uint8 at the spec's size), one model call."""
    started = time.perf_counter()
    probs = softmax(bundle.run(bundle.encode(images)))
    brightness, contrast = brightness_contrast(np.stack(images))
    stats = BatchStats(texts=len(images), requests=1, groups=1, real_tokens=0,
                       padded_tokens=0, seconds=time.perf_counter() - started, lengths=[],
                       unknown=[], predicted=probs.argmax(axis=1).tolist(), bundle=bundle,
                       features={"brightness": brightness.tolist(),
                                 "contrast": contrast.tolist()})
    return probs, stats
