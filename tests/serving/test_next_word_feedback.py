"""A next-word service's prediction log, feedback and drift, through real HTTP:
/predict and /generate answers are logged under the word the model put first; a
client's label, the word typed next, is normalised by the bundle's tokenizer and
stored; live top-1 accuracy follows from the labels; drift compares prompts' lengths
and the model's surprisal at them with the bundle's reference.

The bundle is tests/next_word_bundle.py's: a tiny DecoderLM that has memorised four
short documents (its drift reference is measured on their beginnings, as deploy
measures it on validation documents')."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from conftest import eventually, metric_samples, post_json, running_service
from next_word_bundle import DOCUMENTS, build_bundle

WINDOW = 200  # the drift window: 200 prompts replace it


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("next-word-feedback") / "bundle")


@pytest.fixture
def served(bundle, tmp_path):
    """A service of its own per test: live accuracy and the drift window start empty."""
    with running_service(bundle, tmp_path, workers=1, drift_window=WINDOW) as running:
        yield running, tmp_path / "predictions.db"




def rows(db, sql: str, *args) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute(sql, args).fetchall()


def test_answers_are_logged_and_the_word_typed_next_labels_them(served):
    (service, db) = served
    answer = post_json(service.url, "/predict", {"texts": ["the cat", "a bird"], "k": 3}).json()
    rid = answer["request_id"]
    tops = [p["next_words"][0]["word"] for p in answer["predictions"]]
    assert tops[0] == "sat"
    # "Sat" is the suggestion taken (the tokenizer lower-cases); "sings," is not "sang"
    stored = post_json(service.url, "/feedback", [
        {"request_id": rid, "position": 0, "label": "Sat"},
        {"request_id": rid, "position": 1, "label": "sings,"}])
    assert stored.status_code == 200, stored.text
    logged = rows(db, "SELECT position, label, probabilities FROM predictions "
                      "WHERE request_id = ? ORDER BY position", rid)
    assert [label for _, label, _ in logged] == tops
    assert [w for w, _ in json.loads(logged[0][2])["next_words"]] == \
        [w["word"] for w in answer["predictions"][0]["next_words"]]
    assert rows(db, "SELECT position, label FROM feedback WHERE request_id = ? "
                    "ORDER BY position", rid) == [(0, "sat"), (1, "sings")]
    metrics = eventually(lambda: (m := metric_samples(service.url)).get("textops_live_labels") == 2
                         and m)
    assert metrics["textops_live_accuracy"] == 0.5
    # top-1 accuracy only: no series per word of the vocabulary
    assert not any(name.startswith("textops_live_recall") for name in metrics)


def test_a_continuation_is_logged_under_the_models_first_word(served):
    (service, db) = served
    window = metric_samples(service.url)["textops_drift_window_texts"]
    answer = post_json(service.url, "/generate", {"prompt": "my old friend",
                                             "max_new_tokens": 3}).json()
    # its prompt joins the drift window, as a /predict text does
    assert metric_samples(service.url)["textops_drift_window_texts"] == window + 1
    first = answer["tokens"][0]
    assert post_json(service.url, "/feedback", {"request_id": answer["request_id"],
                                           "label": first}).status_code == 200
    (logged,) = rows(db, "SELECT label, probabilities FROM predictions WHERE request_id = ?",
                     answer["request_id"])
    assert logged[0] == first == "wrote"
    assert json.loads(logged[1]) == {"completion": answer["text"], "finish_reason": "length"}
    # a sample is logged under the top word, as /predict answers it, not under its own
    # draw: live accuracy stays top-1 accuracy
    top = post_json(service.url, "/predict", {"texts": ["a bird"]}).json()
    suggested = top["predictions"][0]["next_words"][0]["word"]
    for seed in range(20):
        sampled = post_json(service.url, "/generate", {"prompt": "a bird", "temperature": 5.0,
                                                  "seed": seed, "max_new_tokens": 1}).json()
        if sampled["tokens"][0] != suggested:
            break
    assert sampled["tokens"][0] != suggested, "every sample drew the top word"
    # (the log writes a moment later)
    assert eventually(lambda: rows(db, "SELECT label FROM predictions WHERE request_id = ?",
                                   sampled["request_id"])) == [(suggested,)]
    # an empty prompt: nothing to log (and nothing a label could teach)
    empty = post_json(service.url, "/generate", {"prompt": "", "max_new_tokens": 2}).json()
    assert post_json(service.url, "/feedback", {"request_id": top["request_id"],  # a flush
                                           "label": suggested}).status_code == 200
    assert rows(db, "SELECT 1 FROM predictions WHERE request_id = ?",
                empty["request_id"]) == []


@pytest.mark.parametrize(("label", "says"), [
    ("sat down", "more than one word"), ("  ", "empty"), ("", "empty")])
def test_a_label_that_is_not_one_word_is_refused_naming_the_item(served, label, says):
    (service, _) = served
    rid = post_json(service.url, "/predict", {"texts": ["the cat"]}).json()["request_id"]
    refused = post_json(service.url, "/feedback", [{"request_id": rid, "label": "sat"},
                                               {"request_id": rid, "label": label}])
    assert refused.status_code == 422
    body = refused.json()
    assert body["code"] == "unknown_label" and body["item"] == 1
    assert body["error"].startswith("[1].label: ") and says in body["error"]


def test_drift_reads_prompts_unlike_the_training_text_as_surprising(served):
    (service, _) = served
    words = " ".join(DOCUMENTS).split()
    rng = np.random.default_rng(1)
    # the documents' own beginnings, cut where a writer might pause, fill the window
    beginnings = [" ".join(d.split()[:int(rng.integers(1, len(d.split()) + 1))])
                  for d in DOCUMENTS * (WINDOW // len(DOCUMENTS))]
    for start in range(0, WINDOW, 20):
        post_json(service.url, "/predict", {"texts": beginnings[start:start + 20]})
    usual = metric_samples(service.url)
    # the same words in a random order: known words, and every one a surprise
    shuffled_texts = [" ".join(rng.permutation(words)[:len(text.split())])
                      for text in beginnings]
    for start in range(0, WINDOW, 20):
        post_json(service.url, "/predict", {"texts": shuffled_texts[start:start + 20]})
    shuffled = metric_samples(service.url)
    assert usual["textops_drift_window_texts"] == shuffled["textops_drift_window_texts"] \
        == WINDOW
    assert usual["textops_drift_surprisal_psi"] < 0.2  # the usual reading: no shift
    assert shuffled["textops_drift_surprisal_psi"] > 2.0
    assert shuffled["textops_unknown_token_rate"] == usual["textops_unknown_token_rate"] == 0
    # prompt lengths: texts typed so far, as the reference cuts its documents
    assert usual["textops_drift_length_psi"] < 0.2
    assert not any(name.startswith("textops_predicted_class") for name in shuffled)
