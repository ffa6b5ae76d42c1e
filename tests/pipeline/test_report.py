"""The run report: one self-contained HTML page from a workspace's reports or from an
MLflow run's artifacts, checked as a reader sees it in headless Chromium."""

from __future__ import annotations

import shutil
from html.parser import HTMLParser
from pathlib import Path

import mlflow
import pytest
from conftest import compose, tracking_in
from helpers import synthetic_rows, write_raw
from omegaconf import OmegaConf
from PIL import Image
from test_evaluate import random_predictions
from test_figures import colours, tiny_fit

from pipeline import atomic
from pipeline.config import Paths
from pipeline.data.grouping import leakage
from pipeline.modeling.callbacks import TrainingCurves
from pipeline.reporting import sources
from pipeline.reporting.evaluation_plots import write_plots
from pipeline.reporting.report import MissingMetrics, build_report, main
from pipeline.stages import deploy
from pipeline.stages import evaluate as stage
from pipeline.tasks.scoring import ClassificationScoring, compute_metrics
from pipeline.tasks.text_classification.preprocess import preprocess
from pipeline.tracking import lineage

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")

GATE = OmegaConf.create({"floors": {"accuracy": 0.99, "f1_macro": 0.5}, "max_regression": {}})
MODEL = "synthetic-classifier"


def write_workspace(root: Path) -> dict:
    """Every file a report reads, as the stages write them: the profile from the real
    preprocess, metrics, plots and verdict from evaluate's code on known predictions
    (the verdict refuses: accuracy under a 0.99 floor), the curves of a real (tiny)
    fit, and a bundle's bundle.json and model card. Returns the metrics."""
    paths = Paths(root)
    cfg = compose("experiment=smoke")
    cfg.preprocess.tokenizer.type = "wordpiece"
    cfg.preprocess.tokenizer.min_frequency = 1
    write_raw(paths.raw, {"train": synthetic_rows(200), "test": synthetic_rows(40, seed=1)})
    profile = preprocess(cfg.preprocess, cfg.seed, paths)
    # this data leaks nothing; a finding as the leakage check records one
    profile["leakage"]["test"] = leakage(["superb film <b>plot</b>", "dull"],
                                         ["a superb film <b>plot</b> & more", "good"])
    atomic.write_json(paths.processed / "profile.json", profile)

    probs, labels = random_predictions(60, 2)
    metrics = compute_metrics(probs, labels, ["neg", "pos"])
    atomic.write_json(paths.metrics, metrics)
    write_plots(paths.plots, probs, labels, ["neg", "pos"], metrics, 15)
    verdict = {"model_name": MODEL, **stage.judge(metrics, GATE, None)}
    atomic.write_json(paths.gate, verdict)

    tiny_fit(TrainingCurves(paths.train_curves, paths.train_curves_image), 3,
             root / "models/train-work")

    meta = {"model_name": MODEL, "version": "0123456789abcdef", "task": "text_classification",
            "model": {"name": "lstm"}, "label_names": ["neg", "pos"], "max_length": 64,
            "metrics": metrics, "profile": profile,
            "gate": {"blessed": verdict["blessed"], "reasons": verdict["reasons"]},
            "lineage": {"data": "t", "data_hash": "abc" * 10, "checkpoint_sha256": "f" * 64}}
    atomic.write_json(paths.candidate / "bundle.json", meta)
    atomic.write_text(paths.candidate / "MODEL_CARD.md", deploy.model_card(meta))
    return metrics


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """(root, metrics) of a workspace holding every file a report reads."""
    root = tmp_path_factory.mktemp("workspace")
    return root, write_workspace(root)


@pytest.fixture(scope="module")
def workspace_report(workspace):
    """(the report's path, the metrics it shows) of the complete workspace."""
    root, metrics = workspace
    return build_report(root, root / "reports/report.html"), metrics


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> str:
    """One MLflow database for the module's tests (creating one takes seconds)."""
    return tracking_in(tmp_path_factory.mktemp("mlflow"), "textops")


class Tags(HTMLParser):
    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_the_report_is_one_file_that_loads_nothing(workspace_report):
    page, _ = workspace_report
    tags = Tags(page.read_text())
    images = [attrs["src"] for tag, attrs in tags.tags if tag == "img"]
    assert len(images) == len(sources.EVALUATION_IMAGES) + 1  # and the training curves
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert not [t for t, attrs in tags.tags if t in ("script", "link", "iframe")
                or attrs.get("href", "#").split("#")[0]]


@needs_chromium
def test_a_reader_sees_the_verdict_the_metrics_and_every_picture(workspace_report, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    page, metrics = workspace_report
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1200,1600",
                 f"--user-data-dir={tmp_path}/profile"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        browser.get(page.as_uri())
        images = browser.find_elements(By.TAG_NAME, "img")
        assert len(images) == 5
        for img in images:
            assert browser.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth", img) > 0, \
                img.get_attribute("alt")
        verdict = browser.find_element(By.ID, "verdict")
        assert verdict.is_displayed() and verdict.text == "NOT BLESSED"
        checks = browser.find_element(By.CSS_SELECTOR, "#gate ul.checks").text
        assert f"✗ accuracy {metrics['accuracy']:.4f} < floor 0.99" in checks
        assert "✓ no champion yet: floors only" in checks
        table = browser.find_element(By.CSS_SELECTOR, "#metrics table")
        assert table.is_displayed()
        assert f"accuracy {metrics['accuracy']:.4f}" in table.text
        assert f"ece {metrics['ece']:.4f}" in table.text
        leaks = browser.find_element(By.ID, "data").text
        assert "'superb film plot' (contained) 'a superb film plot & more'" not in leaks
        assert "'superb film <b>plot</b>' (contained)" in leaks  # shown, not interpreted
        assert "# Model card: synthetic-classifier 0123456789abcdef" in \
            browser.find_element(By.ID, "model-card").text
        # nothing fetched from anywhere: the page is the whole report
        assert browser.execute_script(
            "return performance.getEntriesByType('resource').length") == 0
        shot = tmp_path / "report.png"
        assert browser.save_screenshot(str(shot))
    finally:
        browser.quit()
    with Image.open(shot) as image:
        assert image.format == "PNG" and colours(image) > 1


def test_only_the_metrics_are_required(tmp_path):
    paths = Paths(tmp_path)
    probs, labels = random_predictions(40, 2)
    atomic.write_json(paths.metrics, compute_metrics(probs, labels, ["neg", "pos"]))
    text = build_report(tmp_path, tmp_path / "report.html").read_text()
    for missing in ("reports/gate.json is missing", "reports/plots/confusion.png",
                    "reports/train_curves.json is missing",
                    "data/processed/profile.json is missing",
                    "models/current/MODEL_CARD.md is missing"):
        assert f"Not available: {missing}" in text
    assert "<td>f1_macro</td>" in text


def test_without_metrics_the_report_names_the_missing_file(tmp_path, capsys):
    with pytest.raises(MissingMetrics, match="reports/metrics.json is missing"):
        build_report(tmp_path, tmp_path / "report.html")
    assert not (tmp_path / "report.html").exists()
    with pytest.raises(SystemExit, match="reports/metrics.json"):
        main(["--root", str(tmp_path)])


def test_text_from_the_run_is_shown_not_interpreted(tmp_path):
    paths = Paths(tmp_path)
    hostile = '<img src=x onerror="alert(1)">'
    probs, labels = random_predictions(40, 2)
    atomic.write_json(paths.metrics, compute_metrics(probs, labels, ["neg", hostile]))
    atomic.write_text(paths.candidate / "MODEL_CARD.md", "# Card\n<script>alert(2)</script>\n")
    text = build_report(tmp_path, tmp_path / "report.html").read_text()
    assert [tag for tag, _ in Tags(text).tags if tag in ("img", "script")] == []
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in text
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in text


def test_the_command_writes_the_report(tmp_path, capsys):
    paths = Paths(tmp_path)
    probs, labels = random_predictions(40, 2)
    atomic.write_json(paths.metrics, compute_metrics(probs, labels, ["neg", "pos"]))
    main(["--root", str(tmp_path)])
    assert paths.report.read_text().startswith("<!doctype html>")
    assert capsys.readouterr().out == f"report: {paths.report}\n"


def test_a_report_from_an_mlflow_run(workspace, tracking, tmp_path, monkeypatch):
    """The same page from the training run's artifacts, as train, evaluate and deploy
    log them, in a directory that holds none of the workspace's files."""
    from pytorch_lightning.loggers import MLFlowLogger

    root, metrics = workspace
    shutil.copytree(root / "reports", tmp_path / "reports")  # the shared one stays as it is
    paths, uri = Paths(tmp_path), tracking
    logger = MLFlowLogger(experiment_name="textops", tracking_uri=uri)
    tiny_fit(TrainingCurves(paths.train_curves, paths.train_curves_image), 2,
             tmp_path / "work", logger=logger)  # train logs the curves when it ends ...
    client = mlflow.MlflowClient(uri)
    run_id = logger.run_id
    assert sorted(a.path for a in client.list_artifacts(run_id, sources.TRAINING)) == [
        "training/train_curves.json", "training/train_curves.png"]
    # ... and the profile it trained on (pipeline/modeling/training.py's finish)
    client.log_artifact(run_id, str(Paths(root).processed / "profile.json"), sources.TRAINING)
    paths.checkpoint.parent.mkdir(parents=True)
    paths.checkpoint.write_bytes(b"a checkpoint")  # evaluate finds the run by its hash
    client.set_tag(run_id, lineage.CHECKPOINT_TAG, lineage.digest(paths.checkpoint))
    mlflow.set_tracking_uri(uri)
    stage.log_to_run(ClassificationScoring().logged(metrics), atomic.read_json(paths.gate),
                     "textops", paths)
    # deploy registers the bundle as a model version of the run (its artifacts/bundle)
    staged = shutil.copytree(Paths(root).candidate, tmp_path / "model/artifacts/bundle")
    client.create_registered_model(MODEL)
    client.create_model_version(MODEL, str(staged.parent.parent), run_id=run_id)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    text = build_report(elsewhere, elsewhere / "report.html", run_id).read_text()
    assert f"Built from MLflow run {run_id}" in text
    assert "NOT BLESSED" in text and f"<td class=\"num\">{metrics['accuracy']:.4f}</td>" in text
    images = [attrs["src"] for tag, attrs in Tags(text).tags if tag == "img"]
    assert len(images) == 5 and all(src.startswith("data:image/png") for src in images)
    assert "Not available" not in text
    assert "# Model card: synthetic-classifier 0123456789abcdef" in text
    assert "superb film &lt;b&gt;plot&lt;/b&gt;" in text  # the profile's leakage finding


def test_an_unknown_run_is_a_clear_error(tracking, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    with pytest.raises(LookupError, match="no MLflow run 0123abc"):
        build_report(tmp_path, tmp_path / "report.html", "0123abc")


def test_the_run_is_looked_up_where_the_workspace_tracks(tmp_path, monkeypatch):
    """The default sqlite:///mlflow.db is the workspace's, wherever the report is built."""
    from pipeline.reporting.report import tracking_uri_of

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(FileNotFoundError, match="params.yaml"):
        tracking_uri_of(tmp_path)
    atomic.write_text(tmp_path / "params.yaml", "mlflow:\n  tracking_uri: sqlite:///mlflow.db\n")
    assert tracking_uri_of(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri_of(tmp_path) == "http://mlflow.example:5000"
