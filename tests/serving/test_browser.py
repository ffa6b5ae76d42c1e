"""The demo page in headless Chromium (Debian's chromium + chromedriver, driven by
Selenium): type a text, see the label, the probabilities and highlighted tokens, and
give the right label as feedback."""

from __future__ import annotations

import shutil

import pytest

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
