"""An image service beside a challenger, through real HTTP. Shadow mode: the
champion's answers are unchanged, the challenger's label for every uploaded image is
logged beside the champion's, and a label pairs the two as the promotion controller
counts them. Canary mode: the challenger answers its share of the clients, sticky by
X-Client-Key. And what may stand beside an image champion: the same labels and the
same image spec.

The champion is the image smoke bundle (`image_repo`); the challenger is the same model
with two classes' scores swapped in its ONNX graphs, so it names the other of the two
wherever the champion names one of them, and elsewhere agrees.
"""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3

import httpx
import numpy as np
import onnx
import pytest
from conftest import eventually, labelled, metric_samples, post_json, running_service
from onnx import helper

from pipeline.promotion.controller import canary_counts, paired_counts
from pipeline.promotion.sequential import Paired, Unpaired
from serving.bundle import Bundle, BundleError
from serving.bundle.bundle import MODEL_FILES
from serving.engine.canary import takes
from serving.engine.shadow import check_beside

pytestmark = pytest.mark.slow

SCORED = 'textops_shadow_texts_total{outcome="scored"}'
DROPPED = 'textops_shadow_texts_total{outcome="dropped"}'
AGREED = 'textops_shadow_texts_total{outcome="agreed"}'


def swap_scores(model_file, a: int, b: int, classes: int) -> None:
    """Rewrite `model_file` so that its logits for classes `a` and `b` trade places."""
    model = onnx.load(str(model_file))
    graph = model.graph
    (output,) = [o for o in graph.output if o.name == "logits"]
    for node in graph.node:
        node.output[:] = ["logits_unswapped" if o == "logits" else o for o in node.output]
    order = list(range(classes))
    order[a], order[b] = b, a
    graph.initializer.append(helper.make_tensor("swap", onnx.TensorProto.INT64, [classes],
                                                order))
    graph.node.append(helper.make_node("Gather", ["logits_unswapped", "swap"], [output.name],
                                       axis=1))
    onnx.save(model, str(model_file))


@pytest.fixture(scope="module")
def champion(image_bundle):
    return Bundle.load(image_bundle)


@pytest.fixture(scope="module")
def swapped(champion, garments) -> tuple[int, int]:
    """The champion's class for the first garment, and one it gives none of them."""
    named = [int(p.argmax()) for p in champion.predict_proba(garments)]
    return named[0], next(c for c in range(len(champion.label_names)) if c not in named)


@pytest.fixture(scope="module")
def challenger(image_bundle, champion, swapped, tmp_path_factory):
    copy = shutil.copytree(image_bundle, tmp_path_factory.mktemp("challenger") / "bundle")
    for name in MODEL_FILES.values():
        swap_scores(copy / name, *swapped, len(champion.label_names))
    meta = json.loads((copy / "bundle.json").read_text())
    (copy / "bundle.json").write_text(json.dumps({**meta, "version": "swapped-1"}))
    return copy


def labels_of(bundle, garments) -> list[str]:
    """The bundle's own labels, as served (int8)."""
    loaded = Bundle.load(bundle)
    return [loaded.label_names[int(p.argmax())] for p in loaded.predict_proba(garments)]


def b64(images: list[bytes]) -> list[str]:
    return [base64.b64encode(i).decode("ascii") for i in images]


def test_the_challenger_scores_uploaded_images_in_shadow_and_labels_pair_them(
        image_bundle, challenger, champion, garments, swapped, tmp_path):
    theirs, mine = labels_of(image_bundle, garments), labels_of(challenger, garments)
    a, b = (champion.label_names[c] for c in swapped)
    assert (theirs[0], mine[0]) == (a, b)  # the swap took
    with running_service(image_bundle, tmp_path, workers=1, challenger=challenger) as service:
        metadata = httpx.get(f"{service.url}/metadata", timeout=10).json()
        assert metadata["challenger"] == {"version": "swapped-1", "mode": "shadow",
                                          "registry": None}
        answers = [post_json(service.url, "/predict", {"images": b64(garments)})
                   for _ in range(3)]
        uploaded = httpx.post(f"{service.url}/predict", timeout=30, files=[
            ("images", (f"{i}.png", g, "image/png")) for i, g in enumerate(garments)])
        for answer in (*answers, uploaded):
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["model_version"] == champion.version and "role" not in body
            assert [p["label"] for p in body["predictions"]] == theirs
        sent = 4 * len(garments)
        counted = eventually(lambda: (m := metric_samples(service.url)) and (
            m[SCORED] + m[DROPPED] == sent) and m)
        assert counted[DROPPED] == 0
        assert counted[AGREED] == 4 * sum(x == y for x, y in zip(theirs, mine, strict=True))
        rid = answers[0].json()["request_id"]
        # each garment labelled as the champion named it: the challenger is wrong where
        # it swapped, and right elsewhere
        labelled(service.url, [{"request_id": rid, "position": i, "label": label}
                               for i, label in enumerate(theirs)])
    db = tmp_path / "predictions.db"
    with sqlite3.connect(db) as connection:
        shadow = connection.execute(
            "SELECT position, label, probabilities FROM shadow_predictions "
            "WHERE model_version = 'swapped-1' AND request_id = ?", (rid,)).fetchall()
    assert [label for _, label, _ in sorted(shadow)] == mine
    for position, _, probabilities in shadow:  # the champion's scores, two swapped
        scores = np.array(json.loads(probabilities))  # in label order
        own = champion.predict_proba([garments[position]])[0]
        order = np.arange(len(own))
        order[list(swapped)] = swapped[::-1]
        np.testing.assert_allclose(scores, own[order], atol=1e-5)
    differ = sum(x != y for x, y in zip(theirs, mine, strict=True))
    assert differ >= 1
    assert paired_counts(f"sqlite:///{db}", champion.version, "swapped-1") == Paired(
        n=len(garments), b=0, c=differ)


def test_the_challenger_answers_its_share_of_image_clients(image_bundle, challenger,
                                                            champion, garments, tmp_path):
    expected = {"challenger": ("swapped-1", labels_of(challenger, garments)),
                "champion": (champion.version, labels_of(image_bundle, garments))}
    with running_service(image_bundle, tmp_path, workers=1, challenger=challenger,
                         challenger_mode="canary", canary_share=0.5) as service:
        seen: dict[str, set] = {}
        last: dict[str, str] = {}  # the latest request id each model answered
        for user in range(12):
            key = f"user-{user}"
            role = "challenger" if takes(key, 0.5) else "champion"
            for _ in range(2):
                answer = httpx.post(f"{service.url}/predict", json={"images": b64(garments)},
                                    headers={"X-Client-Key": key}, timeout=30)
                assert answer.status_code == 200, answer.text
                body = answer.json()
                assert body["role"] == role
                version, labels = expected[role]
                assert body["model_version"] == version
                assert [p["label"] for p in body["predictions"]] == labels
                seen.setdefault(key, set()).add(version)
                last[role] = body["request_id"]
        assert all(len(versions) == 1 for versions in seen.values())  # sticky
        assert set(last) == {"challenger", "champion"}
        truth = expected["champion"][1][0]  # the first garment as the champion names it
        labelled(service.url, [{"request_id": last[role], "position": 0, "label": truth}
                               for role in last])
    db = tmp_path / "predictions.db"
    with sqlite3.connect(db) as connection:
        logged = dict(connection.execute(
            "SELECT request_id, model_version FROM predictions WHERE position = 0"))
    assert logged[last["challenger"]] == "swapped-1"
    assert logged[last["champion"]] == champion.version
    assert canary_counts(f"sqlite:///{db}", champion.version, "swapped-1") == Unpaired(
        champion_n=1, champion_right=1, challenger_n=1, challenger_right=0)


def test_what_may_stand_beside_an_image_champion(image_bundle, challenger, champion,
                                                 tmp_path):
    check_beside(Bundle.load(challenger), champion, "c")  # another model, same question

    def edited(name: str, change) -> Bundle:
        copy = shutil.copytree(image_bundle, tmp_path / name)
        meta = json.loads((copy / "bundle.json").read_text())
        change(meta)
        (copy / "bundle.json").write_text(json.dumps(meta))
        return Bundle.load(copy)

    def brighter(meta):  # given the champion's pixels, it would see other numbers
        meta["image"]["mean"] = [m + 0.1 for m in np.atleast_1d(meta["image"]["mean"])]
    with pytest.raises(BundleError, match="image spec differs"):
        check_beside(edited("spec", brighter), champion, "c")

    def relabelled(meta):
        meta["label_names"] = list(reversed(meta["label_names"]))
    with pytest.raises(BundleError, match="must answer the champion's question"):
        check_beside(edited("labels", relabelled), champion, "c")
