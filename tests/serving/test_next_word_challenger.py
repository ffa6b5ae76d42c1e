"""A next-word service beside a challenger, through real HTTP. Shadow mode: the
champion's answers are unchanged, the challenger's top words are logged beside every
/predict, V2 and /generate answer, and a label (the word typed next) pairs the two as
the promotion controller counts them. Canary mode: the challenger answers its share
of the clients, sticky by X-Client-Key, and says so, while /generate stays with the
champion. And what may stand beside a next-word champion.

The champion is tests/next_word_bundle.py's tiny model; the challenger has the same
tokenizer and memorised the same documents with "sat" replaced by "walked": after
"the cat" it says "walked" where the champion says "sat", and elsewhere agrees. Its
context is cut to 8 tokens (the champion's: 32), so a prompt the champion takes may
be longer than the challenger's context.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from types import SimpleNamespace

import httpx
import pytest
from conftest import eventually, labelled, metric_samples, post_json, running_service
from next_word_bundle import DOCUMENTS, build_bundle

from pipeline.promotion.controller import canary_counts, paired_counts
from pipeline.promotion.sequential import Paired, Unpaired
from serving.bundle import Bundle, BundleError
from serving.bundle.tasks import TASKS, TEXT_CLASSIFICATION
from serving.engine.canary import takes
from serving.engine.inference import infer
from serving.engine.shadow import check_beside

PROMPTS = ["the cat", "a bird sang", "my old friend wrote", "we"]
LONG = "my old friend wrote a long letter about the sea , the ships and the"  # 15 tokens
CONTEXT = 8  # the challenger's
SCORED = 'textops_shadow_texts_total{outcome="scored"}'
DROPPED = 'textops_shadow_texts_total{outcome="dropped"}'
AGREED = 'textops_shadow_texts_total{outcome="agreed"}'


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("champion") / "bundle")


@pytest.fixture(scope="module")
def challenger(tmp_path_factory):
    path = build_bundle(tmp_path_factory.mktemp("challenger") / "bundle", version="tiny-2",
                        documents=[d.replace(" sat ", " walked ") for d in DOCUMENTS])
    meta = json.loads((path / "bundle.json").read_text())
    (path / "bundle.json").write_text(json.dumps({**meta, "max_len": CONTEXT}))
    return path


def top_words(bundle, texts: list[str], k: int) -> list[list[tuple[str, float]]]:
    """The bundle's own answer, as the batcher computes it (int8, as served)."""
    rows, _ = infer(Bundle.load(bundle), texts, k)
    return rows


def v2_body(text: str, request_id: str, k: int = 2) -> dict:
    return {"id": request_id, "parameters": {"k": k}, "inputs": [
        {"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}


def test_the_challenger_scores_next_words_in_shadow_and_labels_pair_them(
        champion, challenger, tmp_path):
    k = 3
    with running_service(champion, tmp_path, workers=1, challenger=challenger) as service:
        metadata = httpx.get(f"{service.url}/metadata", timeout=10).json()
        assert metadata["challenger"] == {"version": "tiny-2", "mode": "shadow",
                                          "registry": None}
        answers = [post_json(service.url, "/predict", {"texts": PROMPTS, "k": k})
                   for _ in range(5)]
        long = post_json(service.url, "/predict", {"texts": [LONG], "k": k})
        v2 = post_json(service.url, "/v2/models/tiny-next-word/infer",
                       v2_body("the cat", "v2-request"))
        generated = post_json(service.url, "/generate", {"prompt": "the cat",
                                                         "max_new_tokens": 3})
        for answer in (*answers, long, v2, generated):
            assert answer.status_code == 200, answer.text
        # the champion's answers, as it gives them alone
        for answer in answers:
            body = answer.json()
            assert body["model_version"] == "tiny-1" and "role" not in body
            for served, row in zip(body["predictions"], top_words(champion, PROMPTS, k),
                                   strict=True):
                assert [w["word"] for w in served["next_words"]] == [w for w, _ in row]
                assert [w["probability"] for w in served["next_words"]] == pytest.approx(
                    [p for _, p in row], abs=1e-6)
        assert generated.json()["tokens"][0] == "sat" and "role" not in generated.json()
        # every text offered is scored (the long prompt too, cut to the challenger's
        # context), and agreement is the two models' top words compared
        sent = PROMPTS * 5 + [LONG, "the cat", "the cat"]  # /predict, V2, /generate
        counted = eventually(lambda: (m := metric_samples(service.url)) and (
            m[SCORED] + m[DROPPED] == len(sent)) and m)
        assert counted[DROPPED] == 0
        mine = {t: row[0][0] for t, row in zip(sent, top_words(challenger, sent, 1),
                                               strict=True)}
        theirs = {t: row[0][0] for t, row in zip(sent, top_words(champion, sent, 1),
                                                 strict=True)}
        assert (mine["the cat"], theirs["the cat"]) == ("walked", "sat")
        assert counted[AGREED] == sum(mine[t] == theirs[t] for t in sent) >= 5 * 3
        rid = answers[0].json()["request_id"]
        labelled(service.url, [
            {"request_id": rid, "position": 0, "label": "sat"},  # the champion right
            {"request_id": rid, "position": 1, "label": "in"},  # both
            {"request_id": rid, "position": 2, "label": "letter"},  # neither
            {"request_id": rid, "position": 3, "label": "Walked"},  # both ("walked")
            {"request_id": "v2-request", "position": 0, "label": "walked"},  # the challenger
            {"request_id": generated.json()["request_id"], "position": 0,
             "label": "Sat,"}])  # the champion's first word ("sat")
    db = tmp_path / "predictions.db"
    with sqlite3.connect(db) as connection:
        shadow = connection.execute(
            "SELECT p.text, s.label, s.probabilities, p.request_id FROM shadow_predictions s "
            "JOIN predictions p USING (request_id, position) "
            "WHERE s.model_version = 'tiny-2'").fetchall()
        versions = {v for (v,) in connection.execute("SELECT model_version FROM predictions")}
    assert versions == {"tiny-1"}  # the challenger never answers in shadow mode
    assert len(shadow) == len(sent)
    for text, label, probabilities, request_id in shadow:
        words = json.loads(probabilities)["next_words"]
        assert label == words[0][0] == mine[text]
        width = {"v2-request": 2, generated.json()["request_id"]: 1}.get(request_id, k)
        assert len(words) == width
    # the controller's evidence: six labels both answered, one only the challenger got
    # right (the V2 request), two only the champion (/predict's and /generate's "sat")
    assert paired_counts(f"sqlite:///{db}", "tiny-1", "tiny-2") == Paired(n=6, b=1, c=2)


def test_the_challenger_answers_its_share_of_next_word_clients(champion, challenger,
                                                                tmp_path):
    with running_service(champion, tmp_path, workers=1, challenger=challenger,
                         challenger_mode="canary", canary_share=0.5) as service:
        metadata = httpx.get(f"{service.url}/metadata", timeout=10).json()
        assert metadata["challenger"] == {"version": "tiny-2", "mode": "canary",
                                          "registry": None}
        seen: dict[str, set] = {}
        last: dict[str, str] = {}  # the latest request id each model answered
        for user in range(12):
            key = f"user-{user}"
            role = "challenger" if takes(key, 0.5) else "champion"
            for _ in range(2):
                answer = httpx.post(f"{service.url}/predict",
                                    json={"texts": ["the cat", LONG], "k": 2},
                                    headers={"X-Client-Key": key}, timeout=30)
                assert answer.status_code == 200, answer.text
                body = answer.json()
                assert body["role"] == role
                # the answering model's own words, the long prompt answered by either
                version, word = ("tiny-2", "walked") if role == "challenger" else ("tiny-1",
                                                                                  "sat")
                assert body["model_version"] == version
                assert body["predictions"][0]["next_words"][0]["word"] == word
                assert len(body["predictions"][1]["next_words"]) == 2
                seen.setdefault(key, set()).add(version)
                last[role] = body["request_id"]
        assert all(len(versions) == 1 for versions in seen.values())  # sticky
        assert set(last) == {"challenger", "champion"}
        # /generate stays with the champion, whoever asks
        taken = next(key for key in seen if takes(key, 0.5))
        generated = httpx.post(f"{service.url}/generate", json={"prompt": "the cat",
                                                                "max_new_tokens": 3},
                               headers={"X-Client-Key": taken}, timeout=30).json()
        assert (generated["model_version"], generated["role"]) == ("tiny-1", "champion")
        assert generated["tokens"][0] == "sat"
        # V2 has no client key: routed by request id
        ids = [f"v2-{i}" for i in range(40)]
        for rid, version, word in ((next(i for i in ids if takes(i, 0.5)), "tiny-2", "walked"),
                                   (next(i for i in ids if not takes(i, 0.5)), "tiny-1",
                                    "sat")):
            v2 = post_json(service.url, "/v2/models/tiny-next-word/infer",
                           v2_body("the cat", rid))
            assert v2.status_code == 200, v2.text
            assert v2.json()["model_version"] == version
            assert v2.json()["outputs"][0]["data"][0] == word
        labelled(service.url, [{"request_id": last["challenger"], "label": "sat"},
                               {"request_id": last["champion"], "label": "sat"}])
    db = tmp_path / "predictions.db"
    with sqlite3.connect(db) as connection:
        logged = dict(connection.execute(
            "SELECT request_id, model_version FROM predictions WHERE position = 0"))
    assert logged[last["challenger"]] == "tiny-2" and logged[last["champion"]] == "tiny-1"
    assert logged[generated["request_id"]] == "tiny-1"
    assert canary_counts(f"sqlite:///{db}", "tiny-1", "tiny-2") == Unpaired(
        champion_n=1, champion_right=1, challenger_n=1, challenger_right=0)


def edited(bundle, path, edit) -> Bundle:
    """A copy of `bundle` with its tokenizer.json changed by `edit`, loaded."""
    copy = shutil.copytree(bundle, path)
    saved = json.loads((copy / "tokenizer.json").read_text())
    edit(saved)
    (copy / "tokenizer.json").write_text(json.dumps(saved))
    return Bundle.load(copy)


def test_what_may_stand_beside_a_next_word_champion(champion, challenger, tmp_path):
    served = Bundle.load(champion)
    check_beside(Bundle.load(challenger), served, "c")  # another model, a shorter context
    classifier = SimpleNamespace(task=TASKS[TEXT_CLASSIFICATION], decoder=None, meta={},
                                 label_names=["negative", "positive"])
    with pytest.raises(BundleError, match="text_classification model, the champion a "
                                          "next_word one"):
        check_beside(classifier, served, "c")
    with pytest.raises(BundleError, match="next_word model, the champion a "
                                          "text_classification one"):
        check_beside(served, classifier, "c")

    def renamed(saved):  # another vocabulary: words are compared as strings
        vocab = saved["model"]["vocab"]
        vocab["rested"] = vocab.pop("sat")
    check_beside(edited(champion, tmp_path / "vocabulary", renamed), served, "c")

    def cased(saved):  # "The" would never equal a label stored as "the"
        steps = saved["normalizer"]["normalizers"]
        saved["normalizer"]["normalizers"] = [s for s in steps if s["type"] != "Lowercase"]
    with pytest.raises(BundleError, match="normalises or splits words otherwise"):
        check_beside(edited(champion, tmp_path / "cased", cased), served, "c")
