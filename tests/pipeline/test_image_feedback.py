"""Production feedback for images (pipeline/tasks/image_classification/feedback.py):
labelled thumbnails from the prediction log join training through collect and
preprocess, but for a held-out slice, under the leakage rule; hash-only rows are
counted and skipped; a bad row is named by its line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, compose

from pipeline.config import Paths
from pipeline.data.readers import CollectError
from pipeline.data.splits import FEEDBACK_TEST, column, load_splits
from pipeline.tasks.image_classification.arrays import pixels
from pipeline.tasks.image_classification.collect import collect
from pipeline.tasks.image_classification.preprocess import preprocess
from serving.bundle.images import thumbnail

pytestmark = pytest.mark.slow


def config():
    return compose("task=image_classification", "experiment=image_smoke",
                   "data.max_rows=400", "preprocess.feedback_holdout=0.5")


def workspace(tmp_path: Path) -> Paths:
    (tmp_path / "data").mkdir()
    (tmp_path / "data/external").symlink_to(ROOT / "data/external")
    return Paths(tmp_path)


def run(cfg, paths: Paths) -> dict:
    collect(cfg.data, cfg.seed, paths)
    return preprocess(cfg.preprocess, cfg.seed, paths)


def snapshot_row(request: str, position: int, key: str, label: str) -> str:
    return json.dumps({"request_id": request, "position": position, "text": key,
                       "text_sha256": "x", "label": label, "predicted": label,
                       "model_version": "v1", "created": 1.0 + position}) + "\n"


def write_snapshot(paths: Paths, rows: list[str]) -> Path:
    path = paths.root / "data/feedback/labelled.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(rows))
    return path


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """A base run, then the same with a snapshot of: a copy of a test image, a copy of a
    training image, 16 new images in 8 requests of two, and a hash-only row."""
    cfg = config()
    paths = workspace(tmp_path_factory.mktemp("image-feedback"))
    run(cfg, paths)
    base = load_splits(paths.processed)
    test_image, train_image = pixels(base["test"])[0], pixels(base["train"])[0]
    rng = np.random.default_rng(1)
    fresh = rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
    rows = [snapshot_row("r-test", 0, thumbnail(test_image) + "#sha256:a", "Bag"),
            snapshot_row("r-train", 0, thumbnail(train_image) + "#sha256:b", "Coat"),
            snapshot_row("r-hash", 0, "sha256:c", "Coat")]
    rows += [snapshot_row(f"r{i // 2}", i % 2, thumbnail(image) + f"#sha256:f{i}", "Shirt")
             for i, image in enumerate(fresh)]
    write_snapshot(paths, rows)
    profile = run(cfg, paths)
    return base, load_splits(paths.processed), profile, fresh, train_image


def test_thumbnails_join_training_but_for_a_held_out_slice(merged):
    base, splits, profile, fresh, train_image = merged
    report = profile["feedback"]
    assert report["rows_in"] == 18  # the hash-only row carries no pixels
    assert report["near_duplicate_of_val_or_test"] == 1
    assert report["groups_near_training_images"] == 1
    assert report["held_out"] + report["trained"] == 17
    assert 0 < report["held_out"] < 16  # about half of the 8 new requests
    held_ids = set(column(splits[FEEDBACK_TEST], "request_id"))
    trained_ids = {r for r in column(splits["train"], "request_id") if r}
    assert "r-train" in trained_ids and "r-test" not in held_ids | trained_ids
    assert not held_ids & trained_ids  # a request's images are on one side
    assert splits["train"].num_rows == base["train"].num_rows + report["trained"]
    assert splits["val"].num_rows == base["val"].num_rows  # base splits unchanged
    assert splits["test"].num_rows == base["test"].num_rows
    # the held-out images are the logged pixels, with their labels
    held = pixels(splits[FEEDBACK_TEST])
    assert all(any(np.array_equal(image, f) for f in fresh) for image in held)
    assert set(column(splits[FEEDBACK_TEST], "label")) == {6}  # Shirt
    assert profile["splits"][FEEDBACK_TEST]["rows"] == report["held_out"]


def test_a_snapshot_that_grows_keeps_earlier_rows_on_their_side(merged, tmp_path):
    _, splits, _, fresh, _ = merged
    held_before = set(column(splits[FEEDBACK_TEST], "request_id"))
    cfg = config()
    paths = workspace(tmp_path)
    rng = np.random.default_rng(2)
    rows = [snapshot_row(f"r{i // 2}", i % 2, thumbnail(image) + f"#sha256:f{i}", "Shirt")
            for i, image in enumerate(fresh)]
    rows += [snapshot_row(f"s{i}", 0, thumbnail(image) + f"#sha256:g{i}", "Bag")
             for i, image in enumerate(rng.integers(0, 256, (10, 28, 28, 1), dtype=np.uint8))]
    write_snapshot(paths, rows)
    run(cfg, paths)
    held_now = set(column(load_splits(paths.processed)[FEEDBACK_TEST], "request_id"))
    assert held_now & {f"r{i}" for i in range(8)} == held_before


@pytest.mark.parametrize(("key", "label", "message"), [
    ("data:image/png;base64,!!!", "Bag", "line 2: the thumbnail is not valid base64"),
    ("data:image/png;base64,aGVsbG8=", "Bag", "line 2: .*not an image|line 2: .*cannot"),
    (None, "Parrot", "line 2: unknown label 'Parrot'"),
])
def test_a_bad_snapshot_row_is_named_and_nothing_is_written(tmp_path, key, label, message):
    cfg = config()
    paths = workspace(tmp_path)
    good = thumbnail(np.zeros((28, 28, 1), np.uint8))
    path = write_snapshot(paths, [snapshot_row("a", 0, good, "Bag"),
                                  snapshot_row("b", 0, key or good + "#x", label)])
    with pytest.raises(CollectError, match=rf"{path}, {message}"):
        collect(cfg.data, cfg.seed, paths)
    assert not paths.raw.exists()
