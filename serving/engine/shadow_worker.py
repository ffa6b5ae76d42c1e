"""The challenger's process in shadow mode (serving/engine/shadow.py starts one per
server process).

It runs at the machine's lowest CPU priority (SCHED_IDLE, and nice 19 where that is
refused): it gets a core only while the service's own processes leave one idle, so at
saturation it falls behind and the service drops what it cannot queue, rather than
the answers slowing. A process of its own, not a thread, because a thread shares the
server's GIL: one that the scheduler has parked while holding it stalls the event
loop, and the request path's p99 suffered for it.

It takes what is queued (the server process sends requests in batches), about
`max_batch` items at a time, scores them, and sends back each request's answers and
how many agreed with the champion's; the server process logs them (the prediction
log's rules and queue stay in one place).

The lowest priority yields a core to the service, not the core's caches or the other
hardware thread of its physical core: the CPU it takes while the service waits for
the network still slows the answers. With `shadow_cpu` (TEXTOPS_SHADOW_CPU, in cores)
it rests after each batch so that its CPU time stays within that share of the time
passing (`rest`); what arrives meanwhile waits, and past the queue's bound is
dropped and counted.

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

import numpy as np

from serving.engine.following import load_warm
from serving.engine.inference import infer, infer_ids
from serving.predlog.rows import next_word_answers

log = logging.getLogger("serving")
STOP = None
PARENT_CHECK_S = 1.0  # how often a waiting worker checks that its server still lives


def lowest_priority() -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or refused: nice 19 at least
        try:
            os.nice(19)
        except OSError:
            log.warning("shadow: cannot lower the challenger's CPU priority")


def take(requests, max_batch: int, parent: int) -> list | None:
    """The requests waiting, in the messages that hold the first `max_batch` items
    (at least one message); STOP when told to, or when the server process is gone
    (it was killed)."""
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
    batch = list(first)
    items = sum(len(entry[1]) for entry in batch)
    while items < max_batch:  # what else waits (the server process fills the batches)
        try:
            message = requests.get_nowait()
        except queue.Empty:
            break
        if message is STOP:  # finish this batch, then stop
            requests.put(STOP)
            break
        batch += message
        items += sum(len(entry[1]) for entry in message)
    return batch if os.getppid() == parent else STOP


def rest(spent: float, took: float, share: float, parent: int, hurry=None) -> None:
    """Sleep so that `spent` CPU seconds over the batch's `took` seconds and the sleep
    are at most `share` (cores) of the time; wakes early when the server process is
    gone, or when `hurry` (an Event the server process sets as it closes the shadow)
    says to score what is left without resting."""
    until = time.monotonic() + spent / share - took
    while (left := until - time.monotonic()) > 0 and os.getppid() == parent:
        if hurry is None:
            time.sleep(min(left, PARENT_CHECK_S))
        elif hurry.wait(min(left, PARENT_CHECK_S)):
            return


def score(bundle, batch: list) -> tuple[list[tuple], np.ndarray | list]:
    """Each request's (request_id, how many items, how many agreed), and the answers
    to all their items in order, as the log takes them (one array for a classifier:
    cheaper to send than an array per request). An entry is (request_id, items, the
    champion's labels, k, tokenized): class indices for a classifier, top words for a
    next-word model, which answers `k` words per text; `tokenized`: a text classifier's
    texts came as the ids the champion's tokenizer (the same file as ours) made."""
    # as the batcher scores the champion's: texts in length groups (a batch padded to
    # its longest text costs up to twice as much per text), a next-word model's top words
    if any(tokenized for *_, tokenized in batch):
        answers, _ = infer_ids(bundle, [ids for entry in batch
                                        for ids in model_ids(bundle, entry)])
    else:
        items = [item for _, request_items, *_ in batch for item in request_items]
        answers, _ = infer(bundle, items, max(k for _, _, _, k, _ in batch))
    requests, logged, start = [], [], 0
    for request_id, request_items, champion, k, _ in batch:
        mine = answers[start:start + len(request_items)]
        start += len(request_items)
        if bundle.decoder is not None:
            mine = next_word_answers([row[:k] for row in mine])
            logged += mine
            agreed = sum(label == top for (label, _), top in zip(mine, champion, strict=True))
        else:
            agreed = int((mine.argmax(1) == champion).sum())
        requests.append((request_id, len(request_items), agreed))
    return requests, logged if bundle.decoder is not None else answers


def model_ids(bundle, entry: tuple) -> list[list[int]]:
    """An entry's texts as token ids: as they came when the champion tokenized them,
    else through our tokenizer (a reload may have swapped the champion meanwhile)."""
    _, items, _, _, tokenized = entry
    return items if tokenized else bundle.encode(items)


def run(path: str, settings, requests, results, max_batch: int, parent: int,
        hurry=None, tokenizer: str | None = None) -> None:
    """The worker's main: load the challenger, then score until STOP. Each batch's
    outcome goes to `results`, with the CPU seconds this process spent since the last
    one (what shadow mode costs, on /metrics): ("scored", requests, answers, cpu)
    (`score`) or ("failed", items, why, cpu). `tokenizer`: the digest of the
    tokenizer.json the server process loaded with the challenger, whose ids it may
    send; a challenger replaced on disk since then is refused, not fed ids from
    another vocabulary."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lowest_priority()
    # one thread in all: the tokenizer's own pool would spin on cores the service needs
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        bundle = load_warm(path, settings)
    except Exception as err:  # noqa: BLE001 - reported to the server process
        results.put(("broken", 0, f"{type(err).__name__}: {err}"))
        return
    if tokenizer is not None and getattr(bundle.inputs, "digest", None) != tokenizer:
        results.put(("broken", 0, f"{path}: its tokenizer.json changed after the "
                     "service loaded it"))
        return
    counted = time.process_time()  # loading is not scoring
    while (batch := take(requests, max_batch, parent)) is not STOP:
        started = time.monotonic()
        try:
            outcome = ("scored", *score(bundle, batch))
        except Exception:  # noqa: BLE001 - the challenger never fails a request
            outcome = ("failed", sum(len(entry[1]) for entry in batch),
                       traceback.format_exc(limit=5))
        now = time.process_time()
        spent, counted = now - counted, now
        results.put((*outcome, spent))
        if settings.shadow_cpu:
            rest(spent, time.monotonic() - started, settings.shadow_cpu, parent, hurry)
    if os.getppid() != parent:  # orphaned: nobody will read what is left to send
        results.cancel_join_thread()
        requests.cancel_join_thread()
        return
    results.put(STOP)
