"""The challenger's process in shadow mode (serving/engine/shadow.py starts one per
server process).

It runs at the machine's lowest CPU priority (SCHED_IDLE, and nice 19 where that is
refused): it gets a core only while the service's own processes leave one idle, so at
saturation it falls behind and the service drops what it cannot queue, rather than
the answers slowing. A process of its own, not a thread, because a thread shares the
server's GIL: one that the scheduler has parked while holding it stalls the event
loop, and the request path's p99 suffered for it.

It takes what is queued, as one batch of up to `max_batch` items, scores it, and
sends back each request's answers and how many agreed with the champion's; the
server process logs them (the prediction log's rules and queue stay in one place).

It never outlives its server process: before each batch (and every second while
nothing is queued) it checks that its parent is still the server process, and when that
one was killed it exits at once, leaving what it had not sent (a results pipe nobody
reads would hold its exit forever). It ignores SIGINT: it shares the terminal's
process group, and a Ctrl-C is the server's to handle, which then closes it.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import time
import traceback

from serving.engine.batcher import infer
from serving.engine.following import load_warm
from serving.predlog.rows import next_word_answers

log = logging.getLogger("serving")
STOP = None
PARENT_CHECK_S = 1.0  # how often a waiting worker checks that its server still lives
# How long a batch waits to fill up: nobody waits for the shadow's answers, and a model
# call on a full batch costs far less per item than on a few.
FILL_S = 0.05


def lowest_priority() -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or refused: nice 19 at least
        try:
            os.nice(19)
        except OSError:
            log.warning("shadow: cannot lower the challenger's CPU priority")


def take(requests, max_batch: int, parent: int) -> list | None:
    """The requests waiting, up to `max_batch` items (at least one request); STOP
    when told to, or when the server process is gone (it was killed)."""
    while True:
        if os.getppid() != parent:
            return STOP
        try:
            first = requests.get(timeout=PARENT_CHECK_S)
            break
        except queue.Empty:
            continue
    if first is STOP:
        return STOP
    batch, items = [first], len(first[1])
    deadline = time.monotonic() + FILL_S
    while items < max_batch:
        try:
            entry = requests.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if entry is STOP:  # finish this batch, then stop
            requests.put(STOP)
            break
        batch.append(entry)
        items += len(entry[1])
    return batch if os.getppid() == parent else STOP


def score(bundle, batch: list) -> list[tuple]:
    """(request_id, its answers as the log takes them, how many agreed) per request.
    An entry is (request_id, items, the champion's labels, k): class indices for a
    classifier, top words for a next-word model, which answers `k` words per text."""
    items = [item for _, request_items, _, _ in batch for item in request_items]
    if bundle.decoder is not None:  # each text's top words, as the batcher computes them
        answers, _ = infer(bundle, items, max(k for *_, k in batch))
    else:
        answers = bundle.predict_proba(items, batch_size=max(len(items), 1))
    scored, start = [], 0
    for request_id, request_items, champion, k in batch:
        mine = answers[start:start + len(request_items)]
        start += len(request_items)
        if bundle.decoder is not None:
            mine = next_word_answers([row[:k] for row in mine])
            agreed = sum(label == top for (label, _), top in zip(mine, champion, strict=True))
        else:
            agreed = int((mine.argmax(1) == champion).sum())
        scored.append((request_id, mine, agreed))
    return scored


def run(path: str, settings, requests, results, max_batch: int, parent: int) -> None:
    """The worker's main: load the challenger, then score until STOP. Each batch's
    outcome goes to `results`: ("scored", [...]) or ("failed", items, why)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lowest_priority()
    try:
        bundle = load_warm(path, settings)
    except Exception as err:  # noqa: BLE001 - reported to the server process
        results.put(("broken", 0, f"{type(err).__name__}: {err}"))
        return
    while (batch := take(requests, max_batch, parent)) is not STOP:
        try:
            results.put(("scored", score(bundle, batch)))
        except Exception:  # noqa: BLE001 - the challenger never fails a request
            results.put(("failed", sum(len(entry[1]) for entry in batch),
                         traceback.format_exc(limit=5)))
    if os.getppid() != parent:  # orphaned: nobody will read what is left to send
        results.cancel_join_thread()
        requests.cancel_join_thread()
        return
    results.put(STOP)
