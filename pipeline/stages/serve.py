"""serve: check the new bundle in the real service before it goes live.

Starts the service (`python -m serving`) on a free loopback port against the
candidate bundle, waits for readiness, sends canary items from the test split (texts;
images as base64 PNG files; for next-word prediction, the first half of test
documents) over HTTP one request each, and checks every answer against the bundle's
offline prediction for that item alone: the same label (the same top-k next words),
probabilities within `CANARY_TOLERANCE`. Stops the service and writes
`reports/serve.json` (the canary's result) and `reports/runs/serve.json` (this run's
latency percentiles, which DVC does not track). A mismatch, an error answer or a
service that never becomes ready fails the stage.
"""

from __future__ import annotations

import base64
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ops import process
from pipeline import atomic, logs, tasks
from pipeline.config import Paths, load_params
from pipeline.data.splits import load_splits
from serving.bundle import Bundle
from serving.bundle.tasks import NEXT_WORD

# The canary sends one text per request, one request at a time, so the service runs
# each text alone; offline, each text is scored alone too. Both then run the same
# computation, and anything beyond float noise is a serving fault. (Inside other
# batches int8 may differ by up to deploy.int8_batch_max_abs_diff.)
CANARY_TOLERANCE = 1e-5


class CanaryError(RuntimeError):
    pass


def request_body(field: str, item: str | bytes) -> dict:
    """One item as a client sends it to /predict: a text, or an image file in base64."""
    if isinstance(item, bytes):
        item = base64.b64encode(item).decode("ascii")
    return {field: [item]}


def canary(url: str, texts: list, expected: np.ndarray, labels: list[str],
           field: str = "texts") -> dict:
    """Send each item alone; compare with `expected` probabilities; time each request."""
    latencies, mismatches, max_diff = [], [], 0.0
    for i, text in enumerate(texts):
        started = time.perf_counter()
        status, body = process.http_json("POST", f"{url}/predict", request_body(field, text))
        latencies.append((time.perf_counter() - started) * 1000)
        if status != 200:
            raise CanaryError(f"canary row {i}: HTTP {status} {body}")
        answer = body["predictions"][0]
        served = np.array([answer["probabilities"][name] for name in labels])
        diff = float(np.abs(served - expected[i]).max())  # this row's, not the running max
        max_diff = max(max_diff, diff)
        if answer["label"] != labels[int(expected[i].argmax())] or diff > CANARY_TOLERANCE:
            mismatches.append(i)
    return outcome(len(texts), mismatches, max_diff, latencies)


def next_word_canary(url: str, prompts: list[str], expected: list[list[tuple[str, float]]]
                     ) -> dict:
    """For a next-word bundle: each prompt alone to /predict; the served top-k words
    must be the offline ones, their probabilities within `CANARY_TOLERANCE`."""
    latencies, mismatches, max_diff = [], [], 0.0
    k = len(expected[0]) if expected else 1
    for i, prompt in enumerate(prompts):
        started = time.perf_counter()
        status, body = process.http_json("POST", f"{url}/predict",
                                         {"texts": [prompt], "k": k})
        latencies.append((time.perf_counter() - started) * 1000)
        if status != 200:
            raise CanaryError(f"canary prompt {i}: HTTP {status} {body}")
        served = [(w["word"], w["probability"]) for w in body["predictions"][0]["next_words"]]
        diff = max((abs(a[1] - b[1]) for a, b in zip(served, expected[i], strict=False)),
                   default=0.0)
        max_diff = max(max_diff, diff)
        if [w for w, _ in served] != [w for w, _ in expected[i]] or diff > CANARY_TOLERANCE:
            mismatches.append(i)
    return outcome(len(prompts), mismatches, max_diff, latencies)


def outcome(rows: int, mismatches: list[int], max_diff: float, latencies: list[float]
            ) -> dict:
    """A canary's result: what differed, and the latency percentiles."""
    ms = np.asarray(latencies)
    return {
        "rows": rows,
        "mismatches": len(mismatches),
        "first_mismatch": mismatches[0] if mismatches else None,
        "max_abs_prob_diff": max_diff,
        "latency_ms": {p: round(float(np.percentile(ms, q)), 2)
                       for p, q in (("p50", 50), ("p95", 95), ("p99", 99))},
        "latency_ms_mean": round(float(ms.mean()), 2),
    }


def canary_prompts(documents: list[str], count: int, bundle: Bundle) -> list[str]:
    """Prompts from the test documents: the first half of each one's words (the
    service is asked what comes next mid-speech, as a typist would), the first `count`
    of them that fit the model's context."""
    room = (bundle.meta["max_len"] or 0) - 1  # the prompt follows [EOS]
    prompts = [" ".join(words[: max(len(words) // 2, 1)])
               for words in (doc.split() for doc in documents)]
    encoded = bundle.inputs.encode(prompts)
    return [p for p, ids in zip(prompts, encoded, strict=True)
            if room < 0 or len(ids) <= room][:count]


def check_service(cfg: DictConfig, paths: Paths) -> dict:
    """The canary against the service on `paths.candidate`; writes `paths.serve_report`."""
    bundle_dir = paths.candidate
    bundle = Bundle.load(bundle_dir, cfg.serve.precision)
    if bundle.task.name == NEXT_WORD:
        from pipeline.tasks.next_word.processed import prompts

        texts = canary_prompts(prompts(paths, "test"), cfg.serve.canary_rows, bundle)
        expected = [bundle.decoder.next_word_topk([text], cfg.serve.top_k)[0]
                    for text in texts]
        run_canary = partial(next_word_canary, prompts=texts, expected=expected)
    else:
        test = load_splits(paths.processed)["test"]
        texts = tasks.get(bundle.task.name).requests(test)[: cfg.serve.canary_rows]
        expected = np.concatenate([bundle.predict_proba([text]) for text in texts])
        run_canary = partial(canary, texts=texts, expected=expected,
                             labels=bundle.label_names, field=bundle.task.items)
    port = process.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        # The canary's answers go to a log of their own, never the production one. It
        # serves the candidate, which is unsigned (pipeline/tracking/signing.py), over
        # loopback: a public key or a certificate in the environment is not for it.
        service = process.start(bundle_dir, port, Path(tmp) / "service.log",
                                env={"TEXTOPS_PRECISION": cfg.serve.precision,
                                     "TEXTOPS_PREDICTION_LOG": f"sqlite:///{tmp}/canary.db",
                                     "TEXTOPS_BUNDLE_PUBLIC_KEY": "",
                                     "TEXTOPS_TLS_CERT_FILE": "", "TEXTOPS_TLS_KEY_FILE": "",
                                     "TEXTOPS_REQUIRE_TLS": "false"})
        try:
            ready = process.wait_ready(service.url, cfg.serve.ready_timeout_s, service.process)
            result = run_canary(service.url)
        except (RuntimeError, OSError) as err:
            raise CanaryError(f"{err}\n--- service log ---\n{service.log_tail()}") from None
        finally:
            exit_code = process.stop(service.process)
    if ready.get("model_version") != bundle.version:
        raise CanaryError(f"the service reports version {ready.get('model_version')}, "
                          f"the bundle is {bundle.version}")
    if result["mismatches"]:
        raise CanaryError(f"{result['mismatches']} of {result['rows']} canary answers differ "
                          f"from the offline predictions (first: row {result['first_mismatch']})")
    timing = {name: result.pop(name) for name in ("latency_ms", "latency_ms_mean")}
    report = {"bundle_version": bundle.version, "precision": cfg.serve.precision, **result}
    facts = {"service_exit_code": exit_code, **timing}
    atomic.write_json(paths.serve_report, report)  # what the bundle determines
    atomic.write_json(paths.run_facts("serve"), facts)  # what this run measured
    return {**report, **facts}


def main() -> None:
    logs.quiet()
    try:
        report = check_service(load_params(), Paths())
    except CanaryError as err:
        sys.exit(f"serve: {err}")
    lat = report["latency_ms"]
    print(f"serve: {report['rows']} canary answers over HTTP equal the offline predictions; "
          f"latency p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms")


if __name__ == "__main__":
    main()
