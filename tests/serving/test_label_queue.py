"""The label queue: the logged answers most worth a label (smallest margin or largest
entropy first, a shadow challenger's disagreements before all, labelled ones left
out, encrypted texts opened), over HTTP, and out to Label Studio's task format and
back as feedback through `textops`."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from conftest import eventually, post_json, running_service
from cryptography.fernet import Fernet
from omegaconf import OmegaConf

from pipeline.config import compose
from pipeline.promotion.sequential import PROMOTE, Paired, Rule, decide
from serving.predlog import label_studio
from serving.predlog.crypto import cipher_from
from serving.predlog.queue import label_queue
from serving.predlog.store import open_store

TEXTOPS = Path(sys.executable).parent / "textops"
ROOT = Path(__file__).resolve().parents[2]


def logged(url: str, answers: dict[str, list[float] | dict], cipher=None) -> None:
    """One request per text, answered with the given probabilities."""
    store = open_store(url)
    rows = []
    for n, (text, answer) in enumerate(answers.items()):
        stored = cipher.seal(text) if cipher else text
        digest = cipher.digest(text) if cipher else f"sha-{n}"
        rows.append((f"r{n}", 0, 1000.0 + n, "v1", stored, digest,
                     orjson.dumps(answer).decode(), "top"))
    store.write_predictions(rows)
    store.close()


def test_the_least_certain_unlabelled_answers_come_first(tmp_path):
    url = f"sqlite:///{tmp_path / 'log.db'}"
    logged(url, {"sure": [0.99, 0.01], "torn": [0.51, 0.49], "leaning": [0.7, 0.3],
                 "three ways": [0.34, 0.33, 0.33], "labelled": [0.5, 0.5],
                 "continued": {"completion": "and so on", "finish_reason": "length"},
                 "next word": {"next_words": [["sat", 0.4], ["ran", 0.38]]}})
    store = open_store(url)
    assert store.record_feedback([("r4", 0, "neg")], created=2000.0) == []
    store.close()
    by_margin = label_queue(url, None, budget=4)
    assert [i["text"] for i in by_margin] == ["three ways", "next word", "torn", "leaning"]
    assert by_margin[0]["margin"] == pytest.approx(0.01)
    assert by_margin[0]["request_id"] == "r3" and by_margin[0]["position"] == 0
    by_entropy = label_queue(url, None, budget=3, strategy="entropy")
    # the next word's top two leave 0.22 to the rest of the vocabulary: unsure too
    assert [i["text"] for i in by_entropy] == ["three ways", "next word", "torn"]
    everything = label_queue(url, None, budget=100)
    # labelled, and a continuation (no probabilities), are not in the queue
    assert {i["text"] for i in everything} == {"sure", "torn", "leaning", "three ways",
                                               "next word"}
    with pytest.raises(ValueError, match="strategy 'random'"):
        label_queue(url, None, budget=1, strategy="random")


def test_the_running_challengers_disagreements_come_first(log_url):
    """Shadow mode: the answers the challenger labelled otherwise lead the queue, the
    strategy's order within each group; labelled answers stay out, and the rows of a
    retired challenger, or of an earlier request under the same id, reorder nothing."""
    logged(log_url, {"sure": [0.99, 0.01], "torn": [0.51, 0.49], "leaning": [0.7, 0.3],
                     "labelled": [0.5, 0.5], "retired's": [0.6, 0.4], "stale": [0.9, 0.1],
                     "unscored": [0.55, 0.45]})
    store = open_store(log_url)
    # (request, challenger version, its label, when): every answer above is "top"
    store.write_shadow([(rid, 0, when, version, "[0.2, 0.8]", label)
                        for rid, version, label, when in (
                            ("r0", "c2", "other", 1100.0), ("r1", "c2", "top", 1100.0),
                            ("r2", "c2", "other", 1100.0), ("r3", "c2", "other", 1100.0),
                            ("r4", "c1", "other", 1100.0), ("r5", "c2", "other", 900.0))])
    assert store.record_feedback([("r3", 0, "other")], created=2000.0) == []
    store.close()
    queue = label_queue(log_url, None, budget=10, challenger="c2")
    texts = [i["text"] for i in queue]
    assert set(texts[:2]) == {"leaning", "sure"}  # disagreed, in a fixed shuffle
    assert texts[2:] == ["torn", "unscored", "retired's", "stale"]  # then by margin
    assert [i["disagreed"] for i in queue] == [True, True, False, False, False, False]
    assert queue[0]["challenger"] == {"model_version": "c2", "label": "other"}
    assert queue[2]["challenger"] == {"model_version": "c2", "label": "top"}  # agreed
    assert [i["challenger"] for i in queue[3:]] == [None, None, None]
    by_entropy = label_queue(log_url, None, budget=3, strategy="entropy", challenger="c2")
    assert [i["text"] for i in by_entropy] == texts[:3]
    # the retired challenger's version: its row now counts, and no other
    assert [i["text"] for i in label_queue(log_url, None, budget=2, challenger="c1")] == \
        ["retired's", "torn"]
    # no challenger running: the strategy's order alone
    alone = label_queue(log_url, None, budget=10)
    assert [i["text"] for i in alone][:3] == ["torn", "unscored", "retired's"]
    assert not any(i["disagreed"] or i["challenger"] for i in alone)


def test_labels_taken_from_the_queue_do_not_favour_an_equal_challenger(tmp_path):
    """Two equally accurate models (75%), the champion calibrated: least sure where it
    is wrong. Labelling the queue's first 300 answers must not make the challenger look
    better: the disagreements come in an order that ignores the models' scores."""
    rng = np.random.default_rng(7)
    url = f"sqlite:///{tmp_path / 'log.db'}"
    truths, predictions, shadows = {}, [], []
    for n in range(3000):
        rid, truth = f"r{n}", ("pos", "neg")[n % 2]
        champion_right, challenger_right = rng.random(2) < 0.75
        top = rng.uniform(0.75, 1.0) if champion_right else rng.uniform(0.5, 0.7)
        said = truth if champion_right else ("neg" if truth == "pos" else "pos")
        other = truth if challenger_right else ("neg" if truth == "pos" else "pos")
        predictions.append((rid, 0, 1000.0 + n, "v1", f"text {n}", f"sha{n}",
                            orjson.dumps([top, 1 - top]).decode(), said))
        shadows.append((rid, 0, 2000.0 + n, "c1", "[0.5, 0.5]", other))
        truths[rid] = truth
    store = open_store(url)
    store.write_predictions(predictions)
    store.write_shadow(shadows)
    store.close()
    queue = label_queue(url, None, budget=300, challenger="c1")
    only_challenger = sum(i["challenger"]["label"] == truths[i["request_id"]]
                          for i in queue if i["disagreed"])
    only_champion = sum(i["predicted"] == truths[i["request_id"]]
                        for i in queue if i["disagreed"])
    assert only_challenger + only_champion == 300  # every label on a disagreement
    # ordered by the champion's margin, about 270 of 300 favoured the challenger
    assert 0.4 < only_challenger / 300 < 0.6
    rule = Rule.from_config(OmegaConf.to_container(compose([]).promotion))
    assert decide(Paired(300, only_challenger, only_champion), rule).outcome != PROMOTE


def test_an_encrypted_log_is_queued_in_plaintext_for_whoever_holds_the_key(tmp_path):
    url = f"sqlite:///{tmp_path / 'log.db'}"
    cipher = cipher_from(Fernet.generate_key().decode(), None)
    logged(url, {"a private thought": [0.5, 0.5]}, cipher)
    with sqlite3.connect(tmp_path / "log.db") as db:
        assert b"private" not in b"".join(r[0].encode() for r in
                                          db.execute("SELECT text FROM predictions"))
    (item,) = label_queue(url, cipher, budget=5)
    assert item["text"] == "a private thought"


def test_label_studio_tasks_and_annotations_round_trip():
    items = [{"request_id": "r1", "position": 2, "text": "fine film", "predicted": "pos",
              "probabilities": [0.6, 0.4], "model_version": "v1"}]
    (task,) = label_studio.tasks(items, classifier=True)
    assert task["data"] == {"text": "fine film", "request_id": "r1", "position": 2}
    assert task["predictions"][0]["result"][0]["value"] == {"choices": ["pos"]}
    # a shadow challenger's answer goes into the data, to filter the disagreements by
    challenged = {**items[0], "disagreed": True,
                  "challenger": {"model_version": "v2", "label": "neg"}}
    assert label_studio.tasks([challenged], classifier=True)[0]["data"] == {
        **task["data"], "disagreed": True, "challenger_label": "neg",
        "challenger_version": "v2"}
    assert '<Choice value="neg"/>' in label_studio.config(["neg", "pos"])
    assert "TextArea" in label_studio.config(None)
    done = {**task, "annotations": [
        {"result": [{"from_name": "label", "value": {"choices": ["pos"]}}],
         "updated_at": "2026-12-06T08:00:00Z"},
        {"result": [{"from_name": "label", "value": {"choices": ["neg"]}}],
         "updated_at": "2026-12-06T09:00:00Z"}]}
    skipped = {**task, "annotations": [{"was_cancelled": True, "result": []}]}
    assert label_studio.feedback_items([done, skipped, task]) == [
        {"request_id": "r1", "position": 2, "label": "neg"}]  # the latest annotation
    with pytest.raises(label_studio.ExportError, match="task 0: no data.request_id"):
        label_studio.feedback_items([{"data": {"text": "x"}}])
    # an image model's items are its thumbnails; a log of hashes cannot be labelled
    png = {**items[0], "text": "data:image/png;base64,iVBOR#sha"}
    assert label_studio.tasks([png], True, images=True)[0]["data"]["image"] == png["text"]
    assert '<Image name="text" value="$image"/>' in label_studio.config(["a"], images=True)
    with pytest.raises(label_studio.NotLabellable, match="PREDICTION_LOG_IMAGES=thumbnail"):
        label_studio.tasks([{**items[0], "text": "3f2a9c"}], True, images=True)


def test_the_queue_goes_to_label_studio_and_its_labels_come_back(built_bundle, tmp_path):
    bundle_dir, meta = built_bundle
    texts = ["good good good", "bad bad bad", "good bad", "bad good good", "plain words"]
    with running_service(bundle_dir, tmp_path, admin_token="labeller") as service:
        assert httpx.get(f"{service.url}/label-queue", timeout=30).status_code == 401
        answer = post_json(service.url, "/predict", {"texts": texts}).json()
        rid = answer["request_id"]
        margins = sorted(abs(p["probabilities"][meta["label_names"][0]]
                             - p["probabilities"][meta["label_names"][1]])
                         for p in answer["predictions"])
        queue = eventually(lambda: (q := get_queue(service.url, 5))["items"]
                           and len(q["items"]) == 5 and q)
        assert [round(i["margin"], 6) for i in queue["items"]] == \
            [round(m, 6) for m in margins]
        first = queue["items"][0]
        assert first["request_id"] == rid and first["text"] in texts
        out = tmp_path / "tasks.json"
        made = subprocess.run([str(TEXTOPS), "label-queue", "--service-url", service.url,
                               "--budget", "2", "-o", str(out), "--admin-token", "labeller"],
                              cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        tasks = json.loads(out.read_text())
        assert [t["data"]["position"] for t in tasks] == \
            [i["position"] for i in queue["items"][:2]]
        assert "<Choices" in out.with_suffix(".xml").read_text()
        # a labeller picks the other label for the first task and skips the second
        other = next(n for n in meta["label_names"] if n != first["predicted"])
        tasks[0]["annotations"] = [{"result": [{"from_name": "label",
                                                "value": {"choices": [other]}}]}]
        export = tmp_path / "export.json"
        export.write_text(json.dumps(tasks))
        sent = subprocess.run([str(TEXTOPS), "label-import", str(export), "--service-url",
                               service.url], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert sent.returncode == 0, sent.stderr
        assert "1 label(s) sent" in sent.stdout
        with sqlite3.connect(tmp_path / "predictions.db") as db:
            assert db.execute("SELECT request_id, position, label FROM feedback").fetchall() \
                == [(rid, first["position"], other)]
        # a labelled answer leaves the queue
        after = get_queue(service.url, 5)["items"]
        assert len(after) == 4 and first["position"] not in [i["position"] for i in after]


def test_over_http_the_shadow_challengers_disagreements_lead(built_bundle, tmp_path):
    """The service passes its running challenger's version to the queue, and
    `textops label-queue` carries the disagreement into the Label Studio tasks."""
    bundle_dir, meta = built_bundle
    challenger = shutil.copytree(bundle_dir, tmp_path / "challenger")
    (challenger / "bundle.json").write_text(json.dumps({**meta, "version": "challenger-1"}))
    texts = ["good good good", "bad bad bad", "good bad", "plain words"]
    with running_service(bundle_dir, tmp_path, admin_token="labeller",
                         challenger=challenger) as service:
        answer = post_json(service.url, "/predict", {"texts": texts}).json()
        rid, predictions = answer["request_id"], answer["predictions"]
        # a copy of the champion agrees on every text: it is said to have labelled the
        # surest answer otherwise, which would otherwise come last
        surest = max(range(len(texts)), key=lambda n: predictions[n]["score"])
        other = next(n for n in meta["label_names"] if n != predictions[surest]["label"])
        eventually(lambda: disagree(tmp_path / "predictions.db", rid, surest, other))
        queue = get_queue(service.url, 4)
        assert queue["challenger"] == "challenger-1"
        first, *rest = queue["items"]
        assert (first["position"], first["disagreed"], first["challenger"]) == \
            (surest, True, {"model_version": "challenger-1", "label": other})
        assert [i["challenger"]["label"] for i in rest] == [i["predicted"] for i in rest]
        assert not any(i["disagreed"] for i in rest)
        out = tmp_path / "tasks.json"
        made = subprocess.run([str(TEXTOPS), "label-queue", "--service-url", service.url,
                               "--budget", "2", "-o", str(out), "--admin-token", "labeller"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        assert "1 first: the shadow challenger challenger-1" in made.stdout
        data = [t["data"] for t in json.loads(out.read_text())]
        assert [(d["disagreed"], d["challenger_label"]) for d in data] == \
            [(True, other), (False, rest[0]["predicted"])]
        assert data[0]["challenger_version"] == "challenger-1"


def disagree(log: Path, request_id: str, position: int, label: str) -> bool:
    """Give the challenger's logged answer another label, once it is logged."""
    if not log.exists():  # the writer has not opened the log yet
        return False
    with sqlite3.connect(log, timeout=10) as db:
        return db.execute("UPDATE shadow_predictions SET label = ? WHERE request_id = ? "
                          "AND position = ?", (label, request_id, position)).rowcount == 1


def get_queue(url: str, budget: int) -> dict:
    response = httpx.get(f"{url}/label-queue", params={"budget": budget}, timeout=30,
                         headers={"Authorization": "Bearer labeller"})
    assert response.status_code == 200, response.text
    return response.json()
