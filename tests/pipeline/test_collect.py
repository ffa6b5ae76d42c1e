"""collect: every source format, label kinds, and every bad input named precisely."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, compose
from datasets import load_from_disk
from omegaconf import OmegaConf

from pipeline.config import Paths
from pipeline.data.splits import column
from pipeline.tasks.text_classification.collect import CollectError, collect


def files_cfg(**overrides):
    """The `files` data config with overrides (paths are relative to the test's root)."""
    cfg = compose("data=files").data
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def run_collect(cfg, root, seed=42):
    paths = Paths(root)
    return collect(cfg, seed, paths), load_from_disk(str(paths.raw / "dataset"))


def with_bundled_data(root):
    """A root whose data/external is the repository's bundled data: collect reads
    there and writes under root."""
    (root / "data").mkdir(parents=True)
    (root / "data/external").symlink_to(ROOT / "data/external")
    return Paths(root)


def test_bundled_sst2_default(tmp_path):
    cfg = compose().data
    cfg.max_rows = 300
    manifest = collect(cfg, 42, with_bundled_data(tmp_path))
    ds = load_from_disk(str(tmp_path / "data/raw/dataset"))
    assert manifest["label_names"] == ["negative", "positive"]
    assert manifest["splits"]["train"]["rows"] == 300
    assert manifest["splits"]["test"]["rows"] == 300
    assert set(ds) == {"train", "test"}
    assert ds["train"].features["label"].names == ["negative", "positive"]
    # the same seed gives the same sample, and the hash records it
    again = collect(cfg, 42, with_bundled_data(tmp_path / "again"))
    assert again["content_hash"] == manifest["content_hash"]
    other = collect(cfg, 7, with_bundled_data(tmp_path / "other"))
    assert other["content_hash"] != manifest["content_hash"]


def test_ag_news_labels_map_to_class_names(tmp_path):
    cfg = compose("data=ag_news").data
    cfg.max_rows = 200
    manifest = collect(cfg, 42, with_bundled_data(tmp_path))
    assert manifest["label_names"] == ["World", "Sports", "Business", "Sci/Tech"]
    ds = load_from_disk(str(tmp_path / "data/raw/dataset"))
    assert list(ds) == ["train"]
    text = ds["train"][0]["text"]
    assert len(text.split()) > 5  # title and description joined


def test_own_data_example_reads_as_shipped(tmp_path):
    """`data=files` with nothing else: the example in data/external/example/."""
    manifest = collect(compose("data=files").data, 42, with_bundled_data(tmp_path))
    assert sorted(manifest["label_names"]) == ["Business", "Sci/Tech", "Sports", "World"]
    assert manifest["splits"]["train"]["rows"] == 6000
    assert manifest["splits"]["test"]["rows"] == 1600


def write_csv(path, text):
    path.write_text(text, encoding="utf-8")
    return path.name


def test_csv_with_string_labels(tmp_path):
    name = write_csv(tmp_path / "reviews.csv",
                     'review,stars\n"great, really",pos\nawful,neg\n"fine ""ok""",pos\n')
    cfg = files_cfg(**{"splits": {"train": name}, "text_columns": ["review"],
                       "label_column": "stars"})
    manifest, ds = run_collect(cfg, tmp_path)
    assert manifest["label_names"] == ["neg", "pos"]  # sorted distinct values
    assert column(ds["train"], "text") == ['great, really', 'awful', 'fine "ok"']
    assert column(ds["train"], "label") == [1, 0, 1]
    assert manifest["splits"]["train"]["sha256"]


def test_gzip_tsv_and_jsonl_and_parquet(tmp_path):
    with gzip.open(tmp_path / "a.tsv.gz", "wt", encoding="utf-8") as f:
        f.write('text\tlabel\nit \'s "quoted\t1\nbad\t0\n')
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "résumé ok", "label": 1}) + "\n\n"
        + json.dumps({"text": "nope", "label": 0}) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": ["x y", "z"], "label": [0, 1]}), tmp_path / "c.parquet")
    cfg = files_cfg(**{"splits": {"train": "a.tsv.gz", "val": "b.jsonl", "test": "c.parquet"}})
    manifest, ds = run_collect(cfg, tmp_path)
    assert column(ds["train"], "text")[0] == 'it \'s "quoted'  # no quote handling in TSV
    assert column(ds["val"], "text")[0] == "résumé ok"
    assert column(ds["test"], "label") == [0, 1]
    assert manifest["label_names"] == ["0", "1"]
    assert column(ds["val"], "source_row") == [1, 3]  # row numbers in the file, blank line skipped


def test_hub_source_through_load_dataset(tmp_path):
    """The hub path runs datasets.load_dataset; here on a local data set directory."""
    data_dir = tmp_path / "my_dataset"
    data_dir.mkdir()
    (data_dir / "train.csv").write_text("sentence,label\ngood,1\nbad,0\nfine,1\n")
    (data_dir / "test.csv").write_text("sentence,label\nok,1\nmeh,0\n")
    cfg = compose("data=hub").data
    cfg.path = str(data_dir)
    cfg.splits = {"train": "train", "test": "test"}
    manifest, ds = run_collect(cfg, tmp_path)
    assert manifest["splits"]["train"]["rows"] == 3
    assert column(ds["test"], "text") == ["ok", "meh"]
    assert manifest["label_names"] == ["0", "1"]


def test_hub_class_label_names_are_used(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"sentence": Value("string"),
                         "label": ClassLabel(names=["negative", "positive"])})
    DatasetDict(
        train=Dataset.from_dict({"sentence": ["a", "b"], "label": [0, 1]}, features=features),
    ).save_to_disk(str(tmp_path / "saved"))
    # a parquet copy is what a hub repository holds; load_dataset reads the features
    Dataset.load_from_disk(str(tmp_path / "saved" / "train")).to_parquet(
        str(tmp_path / "hubdir" / "train.parquet"))
    cfg = compose("data=hub").data
    cfg.path = str(tmp_path / "hubdir")
    cfg.splits = {"train": "train"}
    manifest, ds = run_collect(cfg, tmp_path)
    assert manifest["label_names"] == ["negative", "positive"]
    assert column(ds["train"], "label") == [0, 1]


# ---------------------------------------------------------------- bad input


BAD_INPUTS = [
    # (file name, bytes, config overrides, expected words in the message)
    ("missing.csv", None, {}, ["missing.csv", "file not found"]),
    ("cols.csv", b"body,label\nx,1\n", {}, ["cols.csv", "row 2", "no column 'text'"]),
    ("empty.csv", b"", {}, ["empty.csv", "empty file"]),
    ("header_only.csv", b"text,label\n", {}, ["header_only.csv", "empty file"]),
    ("unknown.csv", b"text,label\na,0\nb,7\n", {"labels": {"0": "neg", "1": "pos"}},
     ["unknown.csv", "row 3", "unknown label '7'"]),
    ("nolabel.csv", b"text,label\na,0\nb,\n", {}, ["nolabel.csv", "row 3", "missing label"]),
    ("latin1.csv", b"text,label\nok,0\ncaf\xe9,1\n", {}, ["latin1.csv", "line 3", "not UTF-8"]),
    ("fields.csv", b"text,label\na,0,extra\n", {}, ["fields.csv", "line 2", "3 fields"]),
    ("broken.jsonl", b'{"text": "a", "label": 0}\n{"text": \n', {},
     ["broken.jsonl", "line 2", "invalid JSON"]),
    ("nogroup.csv", b"text,label\na,0\n", {"group_column": "review_id"},
     ["nogroup.csv", "row 2", "no column 'review_id'"]),
]


@pytest.mark.parametrize("name,content,overrides,words", BAD_INPUTS,
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_file_and_row_and_writes_nothing(tmp_path, name, content, overrides,
                                                         words):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    cfg = files_cfg(**{"splits": {"train": name}, **overrides})
    out = Paths(tmp_path).raw
    with pytest.raises(CollectError) as err:
        collect(cfg, 42, Paths(tmp_path))
    for word in words:
        assert word in str(err.value)
    assert not out.exists()
    assert not list(out.parent.glob(".raw*"))  # no temporary directory left  # no temp left


def test_a_group_column_is_collected_as_group(tmp_path):
    (tmp_path / "train.csv").write_text("text,label,review\ngreat,1,7\nnot great,0,7\nok,1,9\n")
    cfg = files_cfg(**{"splits": {"train": "train.csv"}, "group_column": "review"})
    manifest, ds = run_collect(cfg, tmp_path)
    assert column(ds["train"], "group") == ["7", "7", "9"]
    assert "group" not in run_collect(files_cfg(**{"splits": {"train": "train.csv"}}),
                                      tmp_path)[1]["train"].column_names


def test_bad_test_split_keeps_the_previous_output(tmp_path):
    """A failed run never replaces or damages what an earlier run wrote."""
    (tmp_path / "train.csv").write_text("text,label\na,0\nb,1\n")
    cfg = files_cfg(**{"splits": {"train": "train.csv"}})
    first = collect(cfg, 42, Paths(tmp_path))
    (tmp_path / "test.csv").write_text("text,label\nc,2\n")
    cfg.splits = {"train": "train.csv", "test": "test.csv"}
    with pytest.raises(CollectError, match=r"test.csv, row 2: unknown label '2'"):
        collect(cfg, 42, Paths(tmp_path))
    manifest = json.loads((Paths(tmp_path).raw / "manifest.json").read_text())
    assert manifest["content_hash"] == first["content_hash"]


# ---------------------------------------------------------------- production feedback


def feedback_line(request_id, text, label, created, position=0):
    return json.dumps({"request_id": request_id, "position": position, "text": text,
                       "text_sha256": "-", "label": label, "predicted": "negative",
                       "model_version": "v1", "created": created})


def sst2_with_feedback(tmp_path, lines):
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "fb.jsonl").write_text("".join(line + "\n" for line in lines))
    cfg = files_cfg(**{"splits": {"train": str(ROOT / "data/external/sst2/train.tsv.gz")},
                       "labels": {"0": "negative", "1": "positive"}, "max_rows": 50,
                       "format": "tsv", "text_columns": ["sentence"],
                       "feedback.snapshot": "data/fb.jsonl"})
    return cfg


def test_feedback_snapshot_becomes_a_split_with_its_provenance(tmp_path):
    cfg = sst2_with_feedback(tmp_path, [
        feedback_line("r1", "tasty soup", "negative", 10.0),
        feedback_line("r1", "stale bread", "negative", 10.0, position=1),
        feedback_line("r2", "tasty soup", "positive", 20.0),   # relabelled later: wins
    ])
    manifest, ds = run_collect(cfg, tmp_path)
    feedback = ds["feedback"]
    assert column(feedback, "text") == ["stale bread", "tasty soup"]
    names = feedback.features["label"].names
    assert [names[i] for i in column(feedback, "label")] == ["negative", "positive"]
    assert column(feedback, "request_id") == ["r1", "r2"]
    assert column(feedback, "position") == [1, 0]
    assert column(feedback, "source_row") == [2, 3]  # the snapshot's lines
    assert manifest["splits"]["feedback"]["rows"] == 2
    assert manifest["splits"]["feedback"]["relabelled_dropped"] == 1
    assert manifest["source"]["feedback"]["snapshot"] == "data/fb.jsonl"


def test_without_a_snapshot_the_output_is_the_base_data_alone(tmp_path):
    cfg = sst2_with_feedback(tmp_path, [feedback_line("r1", "tasty soup", "positive", 1.0)])
    with_feedback, _ = run_collect(cfg, tmp_path)
    (tmp_path / "data" / "fb.jsonl").unlink()
    manifest, ds = run_collect(cfg, tmp_path)
    assert set(ds) == {"train"}
    assert "feedback" not in manifest["source"]  # as before feedback existed
    assert manifest["content_hash"] != with_feedback["content_hash"]
    cfg.feedback.snapshot = None  # switched off
    manifest_off, _ = run_collect(cfg, tmp_path)
    assert manifest_off == manifest


@pytest.mark.parametrize("line,message", [
    (feedback_line("r1", "tasty", "delicious", 1.0),
     "fb.jsonl, line 2: unknown label 'delicious' (the data's classes: negative, positive)"),
    (json.dumps({"request_id": "r1", "position": 0, "text": "tasty", "created": 1.0}),
     "fb.jsonl, line 2: missing field 'label'"),
    ("{not json", "fb.jsonl, line 2: invalid JSON"),
])
def test_bad_feedback_is_named_by_line_and_nothing_is_written(tmp_path, line, message):
    cfg = sst2_with_feedback(tmp_path, [feedback_line("r0", "fine", "positive", 1.0), line])
    with pytest.raises(CollectError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_collect(cfg, tmp_path)
    assert not (tmp_path / "raw").exists()


def test_your_train_file_with_the_example_test_split_is_refused(tmp_path):
    """Overriding only data.splits.train would score your model on the example's data."""
    cfg = files_cfg(**{"splits.train": "data/external/mine/train.csv"})
    with pytest.raises(CollectError, match=r"train read your files but test still the "
                                           r"shipped example .*data\.splits\.test"):
        collect(cfg, 42, Paths(tmp_path))
