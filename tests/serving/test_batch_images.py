"""Batch prediction over images (serving/batch/images.py): a folder of images or a table
of their paths, each answer what the bundle gives the file's bytes, bad files reported
by path, the text path refusing a folder.

The image bundle is written here, not trained: an ONNX Flatten + Gemm with fixed
weights over 8x8 grayscale pixels, three classes, and the spec and bundle.json that
loading checks. Its pixel limit is small, so an over-limit image is small too.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from serving.batch import BadRowsError, BatchError, predict_file
from serving.bundle import MODEL_FILES, Bundle
from serving.bundle.images import ImageSpec
from serving.bundle.inputs import ImageInputs

LABELS = ["boot", "coat", "shirt"]
PROBS = tuple(f"p_{name}" for name in LABELS)
MAX_PIXELS = 4096  # the bundle's limit: a 100x50 image is over it
TENSOR = {"dtype": "float", "shape": ["batch", 1, 8, 8]}


@pytest.fixture(scope="module")
def image_bundle(tmp_path_factory) -> Path:
    """A minimal image bundle: fixed weights, both precisions the same model file."""
    path = tmp_path_factory.mktemp("image-bundle")
    rng = np.random.default_rng(7)
    weights = numpy_helper.from_array((rng.normal(size=(64, 3)) * 0.2).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.array([0.1, -0.2, 0.05], np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["pixels"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, TENSOR["shape"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [weights, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what the installed onnxruntime reads
    for name in MODEL_FILES.values():
        onnx.save(model, path / name)
    spec = ImageSpec(8, 8, 1, mean=(0.4,), std=(0.3,), max_pixels=MAX_PIXELS)
    (path / "image_spec.json").write_text(json.dumps(spec.to_dict()))
    signature = {"inputs": {"pixels": TENSOR},
                 "outputs": {"logits": {"dtype": "float", "shape": ["batch", 3]}}}
    (path / "bundle.json").write_text(json.dumps(
        {"format": 2, "task": "image_classification", "version": "test-images",
         "label_names": LABELS, "signature": signature}))
    return path


def encoded(size: tuple[int, int], mode: str, kind: str, seed: int) -> bytes:
    """An image file's bytes: random pixels, so every image gets its own answer."""
    channels = {"L": 1, "RGB": 3}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels),
                                                  dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode).save(out, kind)
    return out.getvalue()


# path inside the folder -> (size, mode, format); mixed sizes, modes, formats, depths
GOOD = {
    "b/deep/one.png": ((8, 8), "L", "PNG"),
    "a.jpg": ((20, 12), "RGB", "JPEG"),
    "b/two.JPEG": ((9, 30), "L", "JPEG"),
    "b/deep/three.gif": ((16, 16), "L", "GIF"),
    "c/four.bmp": ((5, 7), "RGB", "BMP"),
    "c/five.webp": ((33, 17), "RGB", "WEBP"),
}
IGNORED = {".hidden.png", ".cache/six.png", "notes.txt", "c/readme.md"}


def write_images(folder: Path, names: dict) -> dict[str, bytes]:
    files = {}
    for seed, (name, (size, mode, kind)) in enumerate(names.items()):
        files[name] = encoded(size, mode, kind, seed)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(files[name])
    return files


@pytest.fixture
def photos(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """A folder of good images, with hidden and non-image files the reader must skip."""
    folder = tmp_path / "photos"
    files = write_images(folder, GOOD)
    for name in IGNORED:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(encoded((8, 8), "L", "PNG", 99))
    return folder, files


def expected(bundle_dir: Path, files: list[bytes]) -> np.ndarray:
    return Bundle.load(bundle_dir, "int8").predict_proba(files)


def read_output(path: Path) -> list[dict]:
    """Rows as written, read with the standard library or pyarrow, numbers as numbers."""
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    import csv
    rows = list(csv.DictReader(path.read_text().splitlines()))
    for row in rows:
        row.update({key: float(row[key]) for key in ("score", *PROBS)})
    return rows


def assert_answers(rows: list[dict], probs: np.ndarray) -> None:
    assert len(rows) == len(probs)
    for row, p in zip(rows, probs, strict=True):
        assert row["label"] == LABELS[int(p.argmax())]
        assert row["score"] == pytest.approx(float(p.max()), abs=1e-6)
        assert [row[name] for name in PROBS] == pytest.approx(p.tolist(), abs=1e-6)


def test_a_folder_gives_each_files_answer_in_path_order(image_bundle, photos, tmp_path,
                                                        monkeypatch):
    """Every image below the folder, sorted by path, hidden and other files left out,
    answered as the bundle answers the file's bytes; decoded in the worker processes."""
    folder, files = photos
    names = sorted(files)
    probs = expected(image_bundle, [files[name] for name in names])

    def parent_decodes(*args, **kwargs):
        raise AssertionError("the parent process decoded an image")

    # spawned workers import the real ImageInputs; only this process is patched
    monkeypatch.setattr(ImageInputs, "pixels", parent_decodes)
    summary = predict_file(folder, tmp_path / "out.jsonl", image_bundle, workers=2,
                           batch_size=2)
    rows = read_output(tmp_path / "out.jsonl")
    assert [r["path"] for r in rows] == names
    assert list(rows[0]) == ["path", "label", "score", *PROBS]
    assert_answers(rows, probs)
    assert summary.rows == len(names) and summary.bad_rows == 0
    assert summary.model_version == "test-images"


@pytest.mark.parametrize("out", ["out.csv", "out.parquet"])
def test_a_folder_into_the_other_formats(out, image_bundle, photos, tmp_path):
    folder, files = photos
    names = sorted(files)
    predict_file(folder, tmp_path / out, image_bundle, workers=1)
    rows = read_output(tmp_path / out)
    assert [r["path"] for r in rows] == names
    assert_answers(rows, expected(image_bundle, [files[name] for name in names]))


def write_table(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        path.write_text("id,file\n" + "".join(f"{r['id']},{r['file']}\n" for r in rows))
    return path


@pytest.mark.parametrize("name", ["paths.csv", "paths.jsonl", "paths.parquet"])
def test_a_table_of_paths_relative_to_the_table(name, image_bundle, photos, tmp_path):
    """Paths in the `file` column, relative to the table's own folder (not the working
    directory), in the table's order; the rows keep the table's fields and line."""
    folder, files = photos
    order = ["c/four.bmp", "a.jpg", "b/deep/one.png", "a.jpg"]  # any order, repeats too
    lists = tmp_path / "lists"
    lists.mkdir()
    table = write_table(lists / name, [{"id": i, "file": f"../photos/{n}"}
                                       for i, n in enumerate(order)])
    summary = predict_file(table, tmp_path / "out.jsonl", image_bundle, workers=1)
    rows = read_output(tmp_path / "out.jsonl")
    first = 2 if name.endswith(".csv") else 1  # the header is line 1
    assert [r["line"] for r in rows] == list(range(first, first + len(order)))
    assert [r["file"] for r in rows] == [f"../photos/{n}" for n in order]
    assert [str(r["id"]) for r in rows] == [str(i) for i in range(len(order))]
    assert_answers(rows, expected(image_bundle, [files[n] for n in order]))
    assert summary.rows == len(order)


def bad_photos(folder: Path) -> dict[str, str]:
    """Files that are not usable images, beside the good ones: name -> reason."""
    whole = encoded((40, 40), "L", "PNG", 5)
    (folder / "b" / "broken.png").write_bytes(whole[:len(whole) // 2])
    (folder / "c" / "letter.jpg").write_text("not an image at all")
    (folder / "a_big.png").write_bytes(encoded((100, 50), "L", "PNG", 6))
    return {"a_big.png": f"over the limit of {MAX_PIXELS}",
            "b/broken.png": "truncated or corrupt image data",
            "c/letter.jpg": "not an image Pillow can read"}


def test_a_bad_image_fails_the_run_naming_the_file(image_bundle, photos, tmp_path):
    folder, _ = photos
    broken = bad_photos(folder)
    out = tmp_path / "out.csv"
    out.write_text("an earlier run's output\n")
    with pytest.raises(BadRowsError) as failure:
        predict_file(folder, out, image_bundle, workers=1, batch_size=64)
    listed = dict(line.strip().split(": ", 1) for line in str(failure.value).splitlines()[1:])
    assert sorted(listed) == [str(folder / name) for name in sorted(broken)]
    for name, reason in broken.items():
        assert reason in listed[str(folder / name)]
    # nothing written: the earlier output whole, no partial or errors file beside it
    assert out.read_text() == "an earlier run's output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv", "photos"]


def test_on_error_report_writes_the_good_rows_and_lists_the_bad_files(image_bundle, photos,
                                                                      tmp_path):
    """Through the command line: the good images' rows, the bad files in
    OUT.errors.jsonl by path, in path order; a table's bad rows by line as for text."""
    folder, files = photos
    broken = bad_photos(folder)
    out = tmp_path / "out.csv"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "serving.batch", *map(str, args),
                               "-m", image_bundle, "-w", "2", "--batch-size", "3"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    done = cli(folder, "--out", out, "--on-error", "report")
    assert done.returncode == 0, done.stderr
    assert f"{len(files)} rows, {len(broken)} bad" in done.stdout
    rows = read_output(out)
    assert [r["path"] for r in rows] == sorted(files)
    assert_answers(rows, expected(image_bundle, [files[n] for n in sorted(files)]))
    listed = [json.loads(line) for line in (tmp_path / "out.csv.errors.jsonl").open()]
    assert [e["file"] for e in listed] == [str(folder / name) for name in sorted(broken)]
    assert all(reason in e["reason"] for e, reason in
               zip(listed, [broken[n] for n in sorted(broken)], strict=True))

    table = write_table(tmp_path / "paths.csv", [{"id": 1, "file": "photos/a.jpg"},
                                                  {"id": 2, "file": "photos/gone.png"},
                                                  {"id": 3, "file": ""}])
    failed = cli(table, "--out", tmp_path / "t.csv")
    assert failed.returncode == 1 and f"{table}:4: empty image path" in failed.stderr
    assert not (tmp_path / "t.csv").exists()
    done = cli(table, "--out", tmp_path / "t.csv", "--on-error", "report")
    assert done.returncode == 0, done.stderr
    assert [r["id"] for r in read_output(tmp_path / "t.csv")] == ["1"]
    listed = [json.loads(line) for line in (tmp_path / "t.csv.errors.jsonl").open()]
    assert [(e["file"], e["line"]) for e in listed] == [
        (str(tmp_path / "photos/gone.png"), 3), (str(table), 4)]
    assert "cannot read the file" in listed[0]["reason"]


def test_a_text_bundle_refuses_a_folder(built_bundle, photos, tmp_path):
    bundle_dir, _ = built_bundle
    folder, _ = photos
    with pytest.raises(BatchError, match=r"photos: a folder of images, but the bundle .* "
                                         r"classifies texts"):
        predict_file(folder, tmp_path / "out.csv", bundle_dir, workers=1)
    assert not (tmp_path / "out.csv").exists()
    cli = subprocess.run([sys.executable, "-m", "serving.batch", str(folder), "--out",
                          str(tmp_path / "out.csv"), "-m", str(bundle_dir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "classifies texts" in cli.stderr


def test_an_image_bundle_names_the_column_it_needs(image_bundle, tmp_path):
    table = tmp_path / "texts.csv"
    table.write_text("text\nnot a path\n")
    with pytest.raises(BatchError, match=r"texts\.csv: the bundle classifies images.*"
                                         r"looked for path, file \(columns: 'text'\)"):
        predict_file(table, tmp_path / "out.csv", image_bundle, workers=1)
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    (tmp_path / "empty" / ".hidden" / "a.png").write_bytes(encoded((8, 8), "L", "PNG", 1))
    with pytest.raises(BatchError, match=r"empty: no image files"):
        predict_file(tmp_path / "empty", tmp_path / "out.csv", image_bundle)
