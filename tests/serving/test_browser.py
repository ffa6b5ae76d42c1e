"""The demo page in headless Chromium (Debian's chromium + chromedriver, driven by
Selenium). A text model: type a text, see the label, the probabilities and highlighted
tokens, and give the right label as feedback. An image model: upload a file or draw
one, see the label and probabilities, the occlusion heat map over the image, and give
feedback; the service's errors are shown."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import sqlite3
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import eventually, running_service

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path}/profile"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_demo_page_classifies_and_highlights(browser, live_service, built_bundle):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    browser.get(f"{live_service.url}/")
    wait.until(ready.text_to_be_present_in_element((By.ID, "meta"), built_bundle[1]["version"]))
    box = browser.find_element(By.ID, "text")
    box.clear()
    box.send_keys("superb film, awful plot")
    browser.find_element(By.ID, "classify").click()
    wait.until(ready.visibility_of_element_located((By.ID, "result")))
    assert browser.find_element(By.ID, "label").text in ("neg", "pos")
    bars = browser.find_elements(By.CSS_SELECTOR, "#probs .bar")
    assert [b.find_element(By.CLASS_NAME, "name").text for b in bars] == ["neg", "pos"]
    tokens = browser.find_elements(By.CSS_SELECTOR, "#tokens span")
    assert [t.text for t in tokens][:2] == ["superb", "film"]
    assert all(t.get_attribute("data-attribution") for t in tokens)
    assert any("rgba" in t.value_of_css_property("background-color") for t in tokens)

    # the right label goes to the prediction log under the answer's request_id
    browser.find_element(By.CSS_SELECTOR, "#feedback-labels button[data-label='neg']").click()
    wait.until(ready.text_to_be_present_in_element((By.ID, "feedback-status"), "Recorded"))
    assert "neg" in browser.find_element(By.ID, "feedback-status").text

    box.clear()
    box.send_keys(" ")  # an empty text: the page shows the service's error
    browser.find_element(By.ID, "classify").click()
    wait.until(ready.text_to_be_present_in_element((By.ID, "error"), "is empty"))


def test_on_a_keyed_service_the_page_sends_the_key_typed_in(browser, built_bundle, tmp_path):
    """A service with TEXTOPS_API_KEYS: without the key the page shows the refusal;
    with it typed in, the answer and the feedback both go through."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    bundle_dir, meta = built_bundle
    with running_service(bundle_dir, tmp_path, api_keys="page-key") as service:
        wait = WebDriverWait(browser, 20)
        browser.get(f"{service.url}/")
        wait.until(ready.text_to_be_present_in_element((By.ID, "meta"), meta["version"]))
        box = browser.find_element(By.ID, "text")
        box.clear()
        box.send_keys("superb film")
        browser.find_element(By.ID, "classify").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "error"), "API key"))
        browser.find_element(By.ID, "api-key").send_keys("page-key")
        browser.find_element(By.ID, "classify").click()
        wait.until(ready.visibility_of_element_located((By.ID, "result")))
        assert browser.find_element(By.ID, "label").text in meta["label_names"]
        browser.find_element(By.CSS_SELECTOR, "#feedback-labels button").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "feedback-status"),
                                                       "Recorded"))


def test_the_label_queue_view_labels_the_queued_answers(browser, built_bundle, tmp_path):
    """The page's label queue: the admin token typed in, the queue of the real route
    listed (a shadow challenger's disagreement first, marked), a label clicked goes
    to the log as feedback and takes the answer off the list and off the queue."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    bundle_dir, meta = built_bundle
    challenger = shutil.copytree(bundle_dir, tmp_path / "challenger")
    (challenger / "bundle.json").write_text(json.dumps({**meta, "version": "challenger-1"}))
    texts = ["good good good", "bad bad bad", "good bad"]
    log = tmp_path / "predictions.db"
    with running_service(bundle_dir, tmp_path, admin_token="labeller",
                         challenger=challenger) as service:
        answer = httpx.post(f"{service.url}/predict", json={"texts": texts}, timeout=30).json()
        rid, predictions = answer["request_id"], answer["predictions"]
        # the copy agrees everywhere: it is said to label the surest answer otherwise
        surest = max(range(len(texts)), key=lambda n: predictions[n]["score"])
        other = next(n for n in meta["label_names"] if n != predictions[surest]["label"])

        def disagreed():
            if not log.exists():
                return False
            with sqlite3.connect(log, timeout=10) as db:
                return db.execute("UPDATE shadow_predictions SET label = ? WHERE "
                                  "request_id = ? AND position = ?",
                                  (other, rid, surest)).rowcount == 1

        eventually(disagreed)
        wait = WebDriverWait(browser, 20)
        browser.get(f"{service.url}/")
        wait.until(ready.text_to_be_present_in_element((By.ID, "meta"), meta["version"]))
        browser.find_element(By.CSS_SELECTOR, "#queue-view summary").click()
        token = browser.find_element(By.ID, "admin-token")
        token.send_keys("not the token")
        browser.find_element(By.ID, "load-queue").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "queue-status"), "401"))
        assert "admin token" in browser.find_element(By.ID, "queue-status").text
        token.clear()
        token.send_keys("labeller")
        budget = browser.find_element(By.ID, "queue-budget")
        budget.clear()
        budget.send_keys("2")
        browser.find_element(By.ID, "load-queue").click()
        entries = wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR,
                                                             "#queue-items li"))
        queue = httpx.get(f"{service.url}/label-queue", params={"budget": 2}, timeout=30,
                          headers={"Authorization": "Bearer labeller"}).json()["items"]
        assert [(e.get_attribute("data-request-id"), int(e.get_attribute("data-position")))
                for e in entries] == [(i["request_id"], i["position"]) for i in queue]
        assert "1 first: the challenger challenger-1" in \
            browser.find_element(By.ID, "queue-status").text
        first = entries[0]
        assert int(first.get_attribute("data-position")) == surest
        assert "disagreed" in first.get_attribute("class").split()
        assert first.find_element(By.CLASS_NAME, "queue-text").text == texts[surest]
        assert f'challenger-1 said "{other}"' in first.find_element(By.CLASS_NAME, "why").text
        assert f"margin {queue[0]['margin']:.3f}" in first.text
        assert "disagreed" not in entries[1].get_attribute("class").split()
        assert [b.text for b in first.find_elements(By.TAG_NAME, "button")] == \
            meta["label_names"]

        first.find_element(By.CSS_SELECTOR, f"button[data-label='{other}']").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "queue-status"), "Recorded"))
        assert "1 left" in browser.find_element(By.ID, "queue-status").text
        assert len(browser.find_elements(By.CSS_SELECTOR, "#queue-items li")) == 1
        with sqlite3.connect(log) as db:
            assert db.execute("SELECT request_id, position, label FROM feedback").fetchall() \
                == [(rid, surest, other)]
        after = httpx.get(f"{service.url}/label-queue", timeout=30,
                          headers={"Authorization": "Bearer labeller"}).json()["items"]
        assert surest not in [i["position"] for i in after]

        # an image model's queue holds each image's logged thumbnail (its `text`), or
        # under the default only its sha256, which the page says it cannot show
        thumbnail = data_url(b"\x89PNG...")
        shown = browser.execute_script(
            "model = {...model, task: 'image_classification'};"
            "const item = {request_id: 'r', position: 0, predicted: 'a', margin: 0.1,"
            "              entropy: 0.6, model_version: 'v', disagreed: false};"
            "const [kept, hashed] = [arguments[0], 'sha256:3f2a'].map("
            "    (text) => queueEntry({...item, text}));"
            "return [kept.querySelector('img').getAttribute('src'),"
            "        hashed.querySelector('img'), hashed.textContent];", thumbnail)
        assert shown[:2] == [thumbnail, None]
        assert "PREDICTION_LOG_IMAGES=thumbnail" in shown[2]
        # a next-word answer's label is the word typed next: a box, not a button each
        boxes = browser.execute_script(
            "model = {...model, task: 'next_word', label_names: undefined};"
            "const entry = queueEntry({request_id: 'r', position: 0, text: 'the cat',"
            "    predicted: 'sat', margin: 0.1, entropy: 0.6, model_version: 'v'});"
            "return [entry.querySelectorAll('input.queue-word').length,"
            "        entry.querySelectorAll('button').length];")
        assert boxes == [1, 1]  # and its Send button


# ------------------------------------------------------------------ an image model
# The page asks /metadata for the task: for an image bundle (the image smoke
# experiment's Fashion-MNIST MLP, `image_repo`) it offers a file input and a drawing
# canvas instead of the textarea, the answer's probabilities, the image with an
# occlusion heat map over it, and feedback buttons. `image_repo` runs `dvc repro`
# (a minute or two), so these are slow as its other users are.


@pytest.fixture(scope="module")
def image_service(image_repo, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("browser-images")
    with running_service(image_repo / "models/candidate", log_dir, max_image_bytes=30_000,
                         max_body_bytes=2_000_000) as service:
        service.log_dir = log_dir
        yield service


@pytest.fixture(scope="module")
def garment_png(image_repo, tmp_path_factory) -> Path:
    """A test-split image as the PNG file a user would upload."""
    from pipeline.config import Paths
    from pipeline.data.splits import load_splits
    from pipeline.tasks.image_classification.task import ImageClassification

    test = load_splits(Paths(image_repo).processed)["test"].select(range(1))
    path = tmp_path_factory.mktemp("garment") / "garment.png"
    path.write_bytes(ImageClassification().requests(test)[0])
    return path


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def decoded(url: str) -> np.ndarray:
    """A PNG data URL's pixels, RGBA [height, width, 4]."""
    from PIL import Image

    data = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))


def opened(browser, service):
    """The page for `service`'s image model, ready: (wait, /metadata)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    metadata = httpx.get(f"{service.url}/metadata", timeout=10).json()
    wait = WebDriverWait(browser, 30)
    browser.get(f"{service.url}/")
    wait.until(ready.text_to_be_present_in_element((By.ID, "meta"), metadata["version"]))
    wait.until(ready.visibility_of_element_located((By.ID, "image-file")))
    assert not browser.find_element(By.ID, "text").is_displayed()  # no textarea
    return wait, metadata


def predicted_on_page(browser, wait):
    """Click Predict and wait for the answer: (label, score text)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready

    browser.find_element(By.ID, "predict-image").click()
    wait.until(ready.visibility_of_element_located((By.ID, "result")))
    return (browser.find_element(By.ID, "label").text,
            browser.find_element(By.ID, "score").text)


def uploaded(browser, wait, path: Path):
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "image-file").send_keys(str(path))
    return predicted_on_page(browser, wait)


@pytest.mark.slow
def test_uploaded_image_gets_the_services_answer(browser, image_service, garment_png):
    from selenium.webdriver.common.by import By

    wait, metadata = opened(browser, image_service)
    label, score = uploaded(browser, wait, garment_png)
    # the same file uploaded over HTTP (multipart, as curl -F sends it)
    answer = httpx.post(f"{image_service.url}/predict", timeout=30, files=[
        ("images", ("garment.png", garment_png.read_bytes(), "image/png"))]).json()
    expected = answer["predictions"][0]
    assert label == expected["label"]
    assert score == f"({expected['score'] * 100:.1f}%)"
    bars = browser.find_elements(By.CSS_SELECTOR, "#probs .bar")
    assert [b.find_element(By.CLASS_NAME, "name").text for b in bars] == metadata["label_names"]
    shown = [float(b.find_element(By.CLASS_NAME, "p").text) for b in bars]
    assert shown == pytest.approx([expected["probabilities"][n] for n in metadata["label_names"]],
                                  abs=6e-4)
    # the image sent is shown, and no token view
    preview = browser.find_element(By.ID, "preview")
    assert preview.get_attribute("src") == data_url(garment_png.read_bytes())
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                  preview) == 28
    assert not browser.find_element(By.ID, "tokens").is_displayed()


@pytest.mark.slow
def test_a_drawing_is_classified(browser, image_service):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    wait, metadata = opened(browser, image_service)
    canvas = browser.find_element(By.ID, "draw")
    actions = ActionChains(browser)
    # offsets from the canvas's centre: the outline of a T-shirt, more or less
    for start, moves in (((-60, -60), [(120, 0), (0, 40), (-30, 0), (0, 80), (-60, 0),
                                       (0, -80), (-30, 0), (0, -40)]),
                         ((-20, -20), [(40, 0), (0, 60), (-40, 0)])):
        actions.move_to_element_with_offset(canvas, *start).click_and_hold()
        for dx, dy in moves:
            actions.move_by_offset(dx, dy)
        actions.release()
    actions.perform()
    assert browser.find_element(By.ID, "source-drawing").is_selected()
    label, _ = predicted_on_page(browser, wait)
    assert label in metadata["label_names"]

    # what was sent is the drawing: white strokes on opaque black, as the page shows it
    canvas_png = "return document.getElementById('draw').toDataURL('image/png')"
    drawing = browser.execute_script(canvas_png)
    assert browser.find_element(By.ID, "preview").get_attribute("src") == drawing
    pixels = decoded(drawing)
    assert (pixels[:, :, 3] == 255).all()
    white = (pixels[:, :, :3].min(axis=2) > 200).mean()
    assert 0.03 < white < 0.6
    again = httpx.post(f"{image_service.url}/predict", json={"images": [drawing]}, timeout=30)
    assert again.json()["predictions"][0]["label"] == label

    # Clear: a blank canvas, and nothing drawn to send
    browser.find_element(By.ID, "clear").click()
    blank = decoded(browser.execute_script(canvas_png))
    assert (blank[:, :, :3] == 0).all() and (blank[:, :, 3] == 255).all()

@pytest.mark.slow
def test_explain_draws_the_saliency_grid_over_the_image(browser, image_service, garment_png):
    from selenium.webdriver.common.by import By

    wait, metadata = opened(browser, image_service)
    uploaded(browser, wait, garment_png)
    heat = browser.find_element(By.ID, "heat")
    assert not heat.is_displayed()
    browser.find_element(By.ID, "explain-image").click()
    wait.until(lambda _: heat.get_attribute("data-rows"))
    saliency = httpx.post(f"{image_service.url}/explain", timeout=30,
                          json={"image": data_url(garment_png.read_bytes())}).json()["saliency"]
    rows, cols = saliency["rows"], saliency["cols"]
    shown = int(heat.get_attribute("data-rows")), int(heat.get_attribute("data-cols"))
    assert shown == (rows, cols)
    assert heat.is_displayed()

    # the overlay covers the preview exactly, at its size
    size = browser.execute_script(
        "const h = arguments[0], p = document.getElementById('preview');"
        "const a = h.getBoundingClientRect(), b = p.getBoundingClientRect();"
        "return [h.width, h.height, a.left, a.top, a.width, a.height,"
        "        b.left, b.top, b.width, b.height];", heat)
    width, height, *boxes = size
    assert boxes[:4] == boxes[4:] and (width, height) == (boxes[2], boxes[3])

    # each cell's centre: red where hiding the cell lowers the label's probability,
    # blue where it raises it, more opaque the larger the change
    image = metadata["image"]
    ch, cw = saliency["cell_height"], saliency["cell_width"]
    points = [[int((c * cw + min(cw, image["width"] - c * cw) / 2) * width / image["width"]),
               int((r * ch + min(ch, image["height"] - r * ch) / 2) * height / image["height"])]
              for r in range(rows) for c in range(cols)]
    flat = browser.execute_script(
        "const h = arguments[0], pen = h.getContext('2d');"
        "return arguments[1].map(([x, y]) => Array.from(pen.getImageData(x, y, 1, 1).data));",
        heat, points)
    centres = [flat[r * cols:(r + 1) * cols] for r in range(rows)]
    values = saliency["values"]
    scale = max(abs(v) for row in values for v in row)
    assert scale > 0
    assert sum(1 for row in centres for *_, a in row if a > 0) >= rows * cols // 4
    for r in range(rows):
        for c in range(cols):
            red, _, blue, alpha = centres[r][c]
            value = values[r][c]
            assert alpha == pytest.approx(255 * 0.7 * abs(value) / scale, abs=3), (r, c)
            if abs(value) > 0.1 * scale:
                assert (red > blue) == (value > 0), (r, c, value, centres[r][c])
    assert "row" in browser.find_element(By.ID, "heat-summary").text


@pytest.mark.slow
def test_feedback_on_an_image_answer_is_stored(browser, image_service, garment_png):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready

    wait, metadata = opened(browser, image_service)
    label, _ = uploaded(browser, wait, garment_png)
    buttons = browser.find_elements(By.CSS_SELECTOR, "#feedback-labels button")
    assert [b.text for b in buttons] == metadata["label_names"]
    right = next(name for name in metadata["label_names"] if name != label)
    browser.find_element(By.CSS_SELECTOR, f"#feedback-labels button[data-label='{right}']").click()
    wait.until(ready.text_to_be_present_in_element((By.ID, "feedback-status"), "Recorded"))

    def stored():
        with sqlite3.connect(image_service.log_dir / "predictions.db") as db:
            return db.execute(
                "select f.request_id, f.position, f.label, p.text from feedback f join "
                "predictions p using (request_id, position)").fetchall()

    [(request_id, position, given, image)] = eventually(stored)
    assert (position, given) == (0, right)
    assert image == f"sha256:{hashlib.sha256(garment_png.read_bytes()).hexdigest()}"
    assert request_id in browser.find_element(By.ID, "feedback-status").text


@pytest.mark.slow
def test_the_services_errors_are_shown(browser, image_service, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready

    wait, _ = opened(browser, image_service)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"these are notes, not a picture")
    browser.find_element(By.ID, "image-file").send_keys(str(not_an_image))
    browser.find_element(By.ID, "predict-image").click()
    wait.until(ready.text_to_be_present_in_element((By.ID, "error"), "not an image"))
    assert not browser.find_element(By.ID, "result").is_displayed()

    # over the service's 30 kB per image: its 413 is shown too
    noise = tmp_path / "noise.png"
    Image.frombytes("RGB", (120, 120), os.urandom(120 * 120 * 3)).save(noise)
    assert noise.stat().st_size > 30_000
    browser.find_element(By.ID, "image-file").send_keys(str(noise))
    browser.find_element(By.ID, "predict-image").click()
    wait.until(ready.text_to_be_present_in_element((By.ID, "error"), "30000"))


# ------------------------------------------------------------------ a next-word model
# For a next-word bundle (tests/next_word_bundle.py: a tiny model that has memorised
# four short documents) the page offers a textarea with the model's next words as
# chips while one types, sends the word actually typed next as feedback, and streams a
# continuation from /generate. The service keeps its prediction log beside its own log
# (running_service's TEXTOPS_PREDICTION_LOG), where the feedback is read back.


@pytest.fixture(scope="module")
def next_word_service(tmp_path_factory):
    from next_word_bundle import build_bundle

    bundle = build_bundle(tmp_path_factory.mktemp("browser-next-word") / "bundle")
    log_dir = tmp_path_factory.mktemp("browser-next-word-log")
    with running_service(bundle, log_dir,
                         prediction_log=f"sqlite:///{log_dir / 'predictions.db'}") as service:
        service.log_dir = log_dir
        yield service


def next_word_page(browser, service):
    """The page for `service`'s next-word model, ready: (wait, /metadata, textarea)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    metadata = httpx.get(f"{service.url}/metadata", timeout=10).json()
    assert metadata["task"] == "next_word"
    wait = WebDriverWait(browser, 30)
    browser.get(f"{service.url}/")
    wait.until(ready.text_to_be_present_in_element((By.ID, "meta"), metadata["version"]))
    box = wait.until(ready.visibility_of_element_located((By.ID, "nw-text")))
    # no classifier or image input, no label to explain
    for hidden in ("text", "classify", "image-file", "result", "explain-image"):
        assert not browser.find_element(By.ID, hidden).is_displayed(), hidden
    return wait, metadata, box


def suggested(browser, wait, service, text: str) -> tuple[list[dict], str]:
    """Wait until the chips are the service's own top 5 for `text` (typing may have
    shown some for a shorter text first): (its next words, the page's request id)."""
    from selenium.webdriver.common.by import By

    expected = httpx.post(f"{service.url}/predict", json={"texts": [text], "k": 5},
                          timeout=30).json()["predictions"][0]["next_words"]

    def chips():
        shown = browser.find_elements(By.CSS_SELECTOR, "#suggestions button.suggestion")
        return [c.get_attribute("data-word") for c in shown] == [w["word"] for w in expected]

    wait.until(lambda _: chips())
    assert browser.find_element(By.ID, "nw-text").get_attribute("value") == text
    return expected, browser.find_element(By.ID, "suggestions").get_attribute("data-request-id")


def feedback_labels(service) -> dict[str, tuple[int, str]]:
    """request_id: (position, label) of each feedback row in the prediction log."""
    path = service.log_dir / "predictions.db"
    if not path.exists():
        return {}
    with sqlite3.connect(path) as db:
        return {rid: (position, label) for rid, position, label in
                db.execute("select request_id, position, label from feedback")}


def test_next_word_suggestions_while_typing(browser, next_word_service):
    from next_word_bundle import DOCUMENTS
    from selenium.webdriver.common.by import By

    wait, _, box = next_word_page(browser, next_word_service)
    text = " ".join(DOCUMENTS[0].split()[:5])
    assert text == "the cat sat on the"
    box.send_keys(text)
    expected, request_id = suggested(browser, wait, next_word_service, text)
    chips = browser.find_elements(By.CSS_SELECTOR, "#suggestions button.suggestion")
    assert chips[0].get_attribute("data-word") == expected[0]["word"] == "mat"
    assert chips[0].text.endswith(f"{expected[0]['probability'] * 100:.1f}%")
    assert request_id


def test_next_word_suggestion_chip_appends_and_sends_feedback(browser, next_word_service):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready

    wait, _, box = next_word_page(browser, next_word_service)
    text = "the cat sat on the"
    box.send_keys(text)
    _, chip_request = suggested(browser, wait, next_word_service, text)
    browser.find_element(By.CSS_SELECTOR, "#suggestions button[data-word='mat']").click()
    assert box.get_attribute("value") == "the cat sat on the mat"
    # the click asks for the next words of the new text at once
    _, after_chip = suggested(browser, wait, next_word_service, "the cat sat on the mat")
    assert after_chip != chip_request
    wait.until(ready.text_to_be_present_in_element((By.ID, "feedback-status"), "'mat'"))
    status = browser.find_element(By.ID, "feedback-status").text
    assert "feedback sent: 'mat'" in status, status  # not: the service refused it
    assert eventually(lambda: feedback_labels(next_word_service).get(chip_request)) == (0, "mat")

    # a word typed by hand is feedback too, once a space ends it
    box.send_keys(" and ")
    wait.until(ready.text_to_be_present_in_element((By.ID, "feedback-status"), "'and'"))
    status = browser.find_element(By.ID, "feedback-status").text
    assert "feedback sent: 'and'" in status, status
    eventually(lambda: (0, "and") in feedback_labels(next_word_service).values())


def test_next_word_continue_streams_the_continuation(browser, next_word_service):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready

    wait, metadata, box = next_word_page(browser, next_word_service)
    # the settings start at the bundle's generation defaults (6 tokens, greedy)
    tokens, temperature = (browser.find_element(By.ID, name) for name in
                           ("max-new-tokens", "temperature"))
    assert int(tokens.get_attribute("value")) == metadata["generation"]["max_new_tokens"] == 6
    assert float(temperature.get_attribute("value")) == 0
    prompt = "the cat sat"
    box.send_keys(prompt)
    browser.find_element(By.ID, "continue").click()
    reason = browser.find_element(By.ID, "finish-reason")
    wait.until(lambda _: reason.get_attribute("textContent"))
    expected = httpx.post(f"{next_word_service.url}/generate", timeout=30, json={
        "prompt": prompt, "max_new_tokens": 6, "temperature": 0}).json()
    continuation = browser.find_element(By.ID, "continuation")
    assert continuation.get_attribute("textContent") == expected["text"]
    assert expected["text"].startswith("on the mat")
    assert reason.text == expected["finish_reason"] == "length"
    # it came as a stream: one event per token before the whole answer
    assert continuation.get_attribute("data-tokens") == str(len(expected["tokens"]))

    # an error before the stream starts is the service's HTTP error, shown as such
    tokens.clear()
    tokens.send_keys("100000")
    browser.find_element(By.ID, "continue").click()
    wait.until(ready.text_to_be_present_in_element((By.ID, "error"), "max_new_tokens"))
    assert not browser.find_element(By.ID, "accept").is_enabled()


def test_next_word_accept_appends_the_continuation(browser, next_word_service):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready

    wait, _, box = next_word_page(browser, next_word_service)
    box.send_keys("a bird sang")
    browser.find_element(By.ID, "continue").click()
    accept = browser.find_element(By.ID, "accept")
    wait.until(lambda _: accept.is_enabled())
    continuation = browser.find_element(By.ID, "continuation")
    text, request_id = (continuation.get_attribute(name)
                        for name in ("textContent", "data-request-id"))
    assert text.startswith("in the tall tree")
    accept.click()
    assert box.get_attribute("value") == f"a bird sang {text}"
    assert not accept.is_enabled()
    suggested(browser, wait, next_word_service, f"a bird sang {text}")
    # the service logs /generate with its first word: taking it is its feedback
    wait.until(ready.text_to_be_present_in_element((By.ID, "feedback-status"), "'in'"))
    status = browser.find_element(By.ID, "feedback-status").text
    assert "feedback sent: 'in'" in status, status
    assert eventually(lambda: feedback_labels(next_word_service).get(request_id)) == (0, "in")
