"""The service serving a next-word bundle, through real HTTP: /predict's top-k and
/generate (JSON and server-sent events) give the bundle's offline answers, alone and
under concurrency (continuous batching), within the limits, the queue bound and the
metrics; and the decoding steps' scheduler on its own: a reload's old sequences
finish on their bundle, a shutdown never hangs.

The bundle is tests/next_word_bundle.py's: a tiny DecoderLM that has memorised four
short documents, int8 as served.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace
from unittest.mock import ANY

import httpx
import pytest
from conftest import answers, metric_samples, running_service, send_without_reading
from next_word_bundle import DOCUMENTS, build_bundle

from serving.bundle import Bundle
from serving.bundle.decoding import Sequence, generate
from serving.bundle.sampling import Sampling
from serving.engine.generation import Closed, Generator
from serving.engine.service import InferenceService
from serving.errors import ApiError

PROMPTS = ["the cat", "a bird sang", "my old friend wrote", "we", ""]
LIMITS = {"max_texts": 4, "max_chars": 120, "max_new_tokens": 40, "max_next_words": 10,
          "next_words": 3}


@pytest.fixture(scope="session")
def next_word_bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("next-word") / "bundle")


@pytest.fixture(scope="session")
def offline(next_word_bundle):
    """The bundle's decoder, as the service loads it (int8)."""
    return Bundle.load(next_word_bundle).decoder


@pytest.fixture(scope="module")
def service(next_word_bundle, tmp_path_factory):
    # one server process: concurrent requests must meet in its decoding steps
    with running_service(next_word_bundle, tmp_path_factory.mktemp("next-word-service"),
                         workers=1, **LIMITS) as running:
        yield running


def post(service, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{service.url}{path}", json=body, timeout=30)


def sse(service, body: dict) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event of a streamed /generate."""
    events, name = [], "message"
    with httpx.stream("POST", f"{service.url}/generate", json={**body, "stream": True},
                      timeout=30) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
                name = "message"
    return events


def scrape(service) -> dict[str, float]:
    return metric_samples(service.url)


# ---------------------------------------------------------------- answers


def test_served_top_k_equals_the_bundles_offline_answer(service, offline):
    response = post(service, "/predict", {"texts": PROMPTS[:4], "k": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "tiny-1"
    assert body["request_id"] == response.headers["x-request-id"]
    for served, expected in zip(body["predictions"], offline.next_word_topk(PROMPTS[:4], 4),
                                strict=True):
        assert [w["word"] for w in served["next_words"]] == [w for w, _ in expected]
        for word, (_, p) in zip(served["next_words"], expected, strict=True):
            assert abs(word["probability"] - p) < 1e-6
    assert body["predictions"][0]["next_words"][0]["word"] == "sat"  # it learnt the text
    # without k: TEXTOPS_NEXT_WORDS of them
    default = post(service, "/predict", {"texts": ["the cat"]}).json()
    assert len(default["predictions"][0]["next_words"]) == LIMITS["next_words"]
    metadata = httpx.get(f"{service.url}/metadata").json()
    assert metadata["task"] == "next_word" and metadata["max_len"] == 32


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_generation_equals_offline_generate(service, offline, prompt):
    response = post(service, "/generate", {"prompt": prompt, "max_new_tokens": 40})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = generate(offline, prompt, Sampling(max_new_tokens=40))
    assert body["text"] == expected.text and body["finish_reason"] == expected.finish_reason
    assert body["tokens"] == offline.inputs.words(expected.generated)
    assert body["usage"] == {"prompt_tokens": len(offline.inputs.encode([prompt])[0]),
                             "completion_tokens": len(expected.generated)}
    # the model memorised its documents: a document's start is continued to its end
    document = next((d for d in DOCUMENTS if d.startswith(prompt)), None)
    if prompt and document:
        assert body["finish_reason"] == "eos"
        assert offline.inputs.encode([f"{prompt} {body['text']}"]) == \
            offline.inputs.encode([document])


def test_a_seeded_sample_repeats_and_another_seed_differs(service, offline):
    request = {"prompt": "the", "temperature": 3.0, "top_p": 0.95, "seed": 7,
               "max_new_tokens": 12}
    first, again = (post(service, "/generate", request).json() for _ in range(2))
    other = post(service, "/generate", {**request, "seed": 8}).json()
    assert first["tokens"] == again["tokens"]
    assert other["tokens"] != first["tokens"]
    offline_sample = generate(offline, "the", Sampling(temperature=3.0, top_p=0.95, seed=7,
                                                       max_new_tokens=12))
    assert first["text"] == offline_sample.text


@pytest.mark.parametrize("request_body", [
    {"prompt": "a bird", "max_new_tokens": 40},
    {"prompt": "the", "temperature": 3.0, "seed": 3, "max_new_tokens": 10},
    {"prompt": "the cat", "stop": ["the door"], "max_new_tokens": 40},
], ids=["greedy", "sampled", "stop"])
def test_a_stream_sends_the_tokens_of_the_json_answer(service, request_body):
    answer = post(service, "/generate", request_body).json()
    events = sse(service, request_body)
    *tokens, (name, last) = events
    assert name == "message" and all(n == "message" for n, _ in tokens)
    assert [data["token"] for _, data in tokens] == answer["tokens"]
    assert tokens[-1][1]["text"].startswith(answer["text"])
    # the last event is the JSON answer (its own request id)
    assert {**last, "request_id": None} == {**answer, "request_id": None}
    if "stop" in request_body:
        assert last["finish_reason"] == "stop" and "door" not in last["text"]


def test_what_a_request_leaves_out_comes_from_the_bundle(service):
    # the bundle's generation defaults: 6 tokens, greedy
    default = post(service, "/generate", {"prompt": "a bird"}).json()
    assert len(default["tokens"]) == 6 and default["finish_reason"] == "length"
    assert post(service, "/generate", {"prompt": "a bird"}).json() == \
        {**default, "request_id": ANY}
    longer = post(service, "/generate", {"prompt": "a bird", "max_new_tokens": 8}).json()
    assert longer["tokens"][:6] == default["tokens"] and len(longer["tokens"]) == 8


def v2_infer(service, body: dict) -> httpx.Response:
    return post(service, "/v2/models/tiny-next-word/infer", body)


def text_input(texts: list[str]) -> dict:
    return {"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}


def test_v2_infer_answers_the_bundles_offline_top_k(service, offline):
    texts = PROMPTS[:4]
    response = v2_infer(service, {"inputs": [text_input(texts)], "parameters": {"k": 4}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "tiny-1"
    assert body["parameters"]["request_id"] == response.headers["x-request-id"]
    words, probs = body["outputs"]
    assert words["name"] == "next_words" and words["datatype"] == "BYTES"
    assert probs["name"] == "probabilities" and probs["datatype"] == "FP32"
    assert words["shape"] == probs["shape"] == [4, 4]
    expected = offline.next_word_topk(texts, 4)
    assert words["data"] == [w for row in expected for w, _ in row]
    assert probs["data"] == pytest.approx([p for row in expected for _, p in row], abs=1e-6)
    # without k: TEXTOPS_NEXT_WORDS of them; `outputs` chooses what comes back
    chosen = v2_infer(service, {"inputs": [text_input(["the cat"])],
                                "outputs": [{"name": "probabilities"}]}).json()["outputs"]
    assert [o["name"] for o in chosen] == ["probabilities"]
    assert chosen[0]["shape"] == [1, LIMITS["next_words"]]
    metadata = httpx.get(f"{service.url}/v2/models/tiny-next-word").json()
    assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert [(o["name"], o["datatype"]) for o in metadata["outputs"]] == \
        [("next_words", "BYTES"), ("probabilities", "FP32")]
    assert metadata["parameters"] == {"k": LIMITS["next_words"],
                                      "max_k": LIMITS["max_next_words"]}


@pytest.mark.parametrize("body,named", [
    ({"inputs": [text_input(["the cat"])], "parameters": {"k": 11}}, "k: at most 10"),
    ({"inputs": [text_input(["the cat"])], "parameters": {"k": "3"}}, "parameter 'k'"),
    ({"inputs": [text_input(["a " * 40])]}, "element 0 has 40 tokens; the model's context"),
    ({"inputs": [text_input(["the cat"])], "outputs": [{"name": "label"}]}, "label"),
], ids=["k_over_the_bound", "k_not_an_int", "prompt_tokens", "unknown_output"])
def test_v2_infer_refuses_what_predict_refuses(service, body, named):
    response = v2_infer(service, body)  # V2 answers bad requests 400, not 422
    assert response.status_code == 400, response.text
    assert named in response.json()["error"]


# ---------------------------------------------------------------- limits


@pytest.mark.parametrize("path,body,field", [
    ("/generate", {"prompt": "the cat", "max_new_tokens": 41}, "max_new_tokens"),
    ("/generate", {"prompt": "the cat", "max_new_tokens": 0}, "max_new_tokens"),
    ("/generate", {"prompt": "a " * 40}, "prompt"),  # 40 tokens; the context holds 31
    ("/generate", {"prompt": "x" * 121}, "prompt"),  # over max_chars
    ("/generate", {"prompt": "the", "stop": [""]}, "stop.0"),
    ("/generate", {"prompt": "the", "temperature": -1.0}, "temperature"),
    ("/predict", {"texts": ["the cat"], "k": 11}, "k"),
    ("/predict", {"texts": ["a " * 40]}, "texts"),
    ("/predict", {"texts": ["the cat"], "images": ["aGVsbG8="]}, "images"),
], ids=["max_new_tokens", "no_new_tokens", "prompt_tokens", "prompt_chars", "empty_stop",
        "temperature", "k", "text_tokens", "images"])
def test_requests_over_the_limits_are_422_naming_the_field(service, path, body, field):
    before = scrape(service).get("textops_decode_step_sequences_count", 0)
    response = post(service, path, body)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert field.split(".")[0] in response.json()["error"]
    assert scrape(service).get("textops_decode_step_sequences_count", 0) == before


def test_generate_needs_a_next_word_model():
    classifier = SimpleNamespace(decoder=None, version="v3",
                                 task=SimpleNamespace(name="text_classification"))
    service = SimpleNamespace(require_bundle=lambda: classifier)
    with pytest.raises(ApiError) as refused:
        InferenceService.require_next_word(service, "/generate")
    assert refused.value.status == 404 and "needs a next-word model" in refused.value.message


# ---------------------------------------------------------------- under load


def test_concurrent_requests_get_the_answers_they_get_alone(service):
    requests = [{"prompt": p, "max_new_tokens": 40} for p in PROMPTS[:4]] * 2
    alone = [post(service, "/generate", r).json()["text"] for r in requests]
    before = scrape(service)
    start, results = threading.Barrier(len(requests)), [None] * len(requests)

    def client(i):
        start.wait()
        results[i] = post(service, "/generate", requests[i]).json()["text"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == alone
    after = scrape(service)
    steps = after["textops_decode_step_sequences_count"] - \
        before["textops_decode_step_sequences_count"]
    rows = after["textops_decode_step_sequences_sum"] - \
        before["textops_decode_step_sequences_sum"]
    assert rows > steps, "no decoding step ever held two requests' sequences"


def test_a_full_queue_is_refused_503_with_retry_after(next_word_bundle, offline, tmp_path):
    with running_service(next_word_bundle, tmp_path, workers=1, max_batch_size=1,
                         max_queue=1, max_texts=1) as small:
        body = {"prompt": "my old friend", "max_new_tokens": 40}
        results = answers([send_without_reading(small.url, "/generate", body)
                           for _ in range(32)])
        metrics = scrape(small)
    statuses = {status for status, _, _ in results}
    assert statuses <= {200, 503}, statuses
    refused = [(headers, data) for status, headers, data in results if status == 503]
    assert refused, "the queue bound never applied to /generate"
    assert refused[0][0]["Retry-After"] == "1" and refused[0][1]["code"] == "overloaded"
    expected = generate(offline, body["prompt"], Sampling(max_new_tokens=40)).text
    answered = [data for status, _, data in results if status == 200]
    assert answered and all(data["text"] == expected for data in answered)
    assert metrics['textops_rejected_total{reason="queue_full"}'] == len(refused)


def test_metrics_count_tokens_and_time_to_first_token(service):
    before = scrape(service)
    body = post(service, "/generate", {"prompt": "a bird", "max_new_tokens": 5}).json()
    after = scrape(service)
    assert len(body["tokens"]) == 5
    assert after["textops_generated_tokens_total"] - \
        before.get("textops_generated_tokens_total", 0) == 5
    assert after["textops_time_to_first_token_seconds_count"] - \
        before.get("textops_time_to_first_token_seconds_count", 0) == 1
    assert after["textops_inter_token_seconds_count"] - \
        before.get("textops_inter_token_seconds_count", 0) == 4
    assert after["textops_running_sequences"] == 0


# ---------------------------------------------------------------- the scheduler alone


class Counting:
    """A stand-in decoder: every step gives each sequence token 7 (never [EOS]), after
    `delay` seconds, and notes how many sequences it was given."""

    def __init__(self, delay: float = 0.0):
        self.delay, self.calls = delay, []
        self.inputs = SimpleNamespace(words=lambda ids: [str(i) for i in ids])

    def advance(self, seqs: list[Sequence]) -> list[int]:
        self.calls.append(len(seqs))
        time.sleep(self.delay)
        for s in seqs:
            s.generated.append(7)
            if len(s.generated) >= s.settings.max_new_tokens:
                s.finish_reason = "length"
        return [7] * len(seqs)


def bundle_of(decoder) -> SimpleNamespace:
    return SimpleNamespace(decoder=decoder)


def test_sequences_finish_on_the_bundle_they_started_with():
    old, new = Counting(delay=0.005), Counting(delay=0.005)

    async def run():
        generator = Generator(max_running=8, max_queue=8)
        first = generator.submit(bundle_of(old), Sequence([2], Sampling(max_new_tokens=10)))
        await asyncio.sleep(0.02)  # a few steps in: then a reload swaps the bundle
        second = generator.submit(bundle_of(new), Sequence([2], Sampling(max_new_tokens=3)))
        deadline = asyncio.get_running_loop().time() + 10
        done = await asyncio.gather(first.result(deadline), second.result(deadline))
        await asyncio.to_thread(generator.close, 1)
        return done

    first, second = asyncio.run(run())
    assert len(first.generated) == 10 and len(second.generated) == 3
    assert sum(old.calls) == 10 and sum(new.calls) == 3  # each on its own bundle
    assert max(old.calls) == max(new.calls) == 1  # never one call for both bundles


def test_shutdown_cuts_what_does_not_finish_in_time_and_never_hangs():
    endless = Counting(delay=0.01)

    async def run():
        generator = Generator(max_running=1, max_queue=8)
        running = generator.submit(bundle_of(endless),
                                   Sequence([2], Sampling(max_new_tokens=10**6)))
        waiting = generator.submit(bundle_of(endless),
                                   Sequence([2], Sampling(max_new_tokens=10**6)))
        started = time.perf_counter()
        await asyncio.to_thread(generator.close, 0.2)
        took = time.perf_counter() - started
        deadline = asyncio.get_running_loop().time() + 5
        outcomes = await asyncio.gather(running.result(deadline), waiting.result(deadline),
                                        return_exceptions=True)
        with pytest.raises(Closed):
            generator.submit(bundle_of(endless), Sequence([2]))
        return took, outcomes, generator.thread.is_alive()

    took, outcomes, alive = asyncio.run(run())
    assert took < 2 and not alive
    assert all(isinstance(o, Closed) for o in outcomes), outcomes


def test_shutdown_lets_running_generations_finish():
    quick = Counting(delay=0.002)

    async def run():
        generator = Generator(max_running=2, max_queue=8)
        gens = [generator.submit(bundle_of(quick), Sequence([2], Sampling(max_new_tokens=20)))
                for _ in range(3)]
        await asyncio.to_thread(generator.close, 10)
        deadline = asyncio.get_running_loop().time() + 5
        return await asyncio.gather(*(g.result(deadline) for g in gens))

    assert [len(s.generated) for s in asyncio.run(run())] == [20, 20, 20]


def test_min_new_tokens_keeps_the_end_of_a_document_from_ending_a_continuation(service,
                                                                               offline):
    """A greedy continuation that ends at [EOS] goes on to min_new_tokens when asked;
    min_new_tokens over max_new_tokens is refused naming the field."""
    prompt = "looked at the door until the dog came home"
    ended = generate(offline, prompt, Sampling(max_new_tokens=12))
    assert ended.finish_reason == "eos"  # the tiny model ends its documents
    answer = httpx.post(f"{service.url}/generate", json={
        "prompt": prompt, "max_new_tokens": 12, "min_new_tokens": 12}, timeout=30).json()
    assert answer["usage"]["completion_tokens"] == 12, answer
    assert answer["finish_reason"] == "length"
    refused = httpx.post(f"{service.url}/generate", json={
        "prompt": "the cat", "max_new_tokens": 4, "min_new_tokens": 5}, timeout=30)
    assert refused.status_code == 422 and refused.json()["field"] == "min_new_tokens"
