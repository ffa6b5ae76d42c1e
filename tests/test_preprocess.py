"""preprocess: normalisation and masking as the tokenizer's own normalizer, cleaning,
splitting, the profile and the validation step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, compose
from datasets import Dataset
from helpers import FEATURES, synthetic_rows, write_raw
from tokenizers import Tokenizer

from pipeline.preprocess import (
    EMAIL,
    PHONE,
    URL,
    ValidationError,
    build_normalizer,
    clean_split,
    preprocess,
)
from pipeline.splits import column, load_splits


@pytest.fixture
def cfg():
    cfg = compose("experiment=smoke").preprocess
    cfg.tokenizer.vocab_size = 300
    cfg.tokenizer.min_frequency = 1
    cfg.validation.max_unk_rate = 0.5
    return cfg


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize("raw,expected", [
    ("Mail ME at John.Doe@Example.COM today", f"mail me at {EMAIL} today"),
    ("see https://example.com/a?b=c&d=e, or www.test.org", f"see {URL} , or {URL}"),
    ("call (555) 123-4567 or +44 20 7946 0958", f"call {PHONE} or {PHONE}"),
    ("from 1995-2000, 300 people", "from 1995-2000, 300 people"),  # not phone numbers
    ("<p>Tom &amp; Jerry</p><br/>", "tom & jerry"),
    ("ﬁne   ＦＵＬＬ\twidth\n", "fine full width"),  # NFKC and whitespace
    ("caf&eacute; &#233;t&eacute;", "caf t"),  # unknown entities become spaces
])
def test_normalisation_and_masking(cfg, raw, expected):
    assert build_normalizer(cfg).normalize_str(raw) == expected


def test_lowercasing_is_configurable(cfg):
    cfg.lowercase = False
    assert build_normalizer(cfg).normalize_str("Keep Case a@b.io") == f"Keep Case {EMAIL}"


def test_saved_tokenizer_reproduces_normalisation_and_masking(tmp_path, cfg):
    """Serving loads tokenizer.json only: it must apply the very same transformation."""
    write_raw(tmp_path / "raw", {"train": synthetic_rows(200), "test": synthetic_rows(40, 1)})
    preprocess(cfg, 42, raw_dir=tmp_path / "raw", out_dir=tmp_path / "out")
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    raw = "<b>GREAT</b> film, write to fan@club.com or http://x.io/?q=1, call 555-123-4567"
    assert tokenizer.normalizer.normalize_str(raw) == build_normalizer(cfg).normalize_str(raw)
    tokens = tokenizer.encode(raw).tokens
    assert tokens[0] == "[CLS]"
    assert {EMAIL, URL, PHONE} <= set(tokens)  # each placeholder is one whole token
    assert "fan" not in tokens and "club" not in tokens
    long = tokenizer.encode(" ".join(["film"] * 500))
    assert len(long.ids) == cfg.max_length  # truncation travels with the file


# ---------------------------------------------------------------- cleaning and splits


def test_cleaning_counts_each_kind(cfg):
    rows = [("good film", 1), ("good film", 1), ("Good  FILM", 1), ("   ", 0),
            ("so-so", 0), ("so-so", 1), ("in test", 1), ("bad", 0)]
    ds = Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows],
                            "source_row": list(range(len(rows)))}, features=FEATURES)
    normalize = build_normalizer(cfg).normalize_str
    kept, report = clean_split(ds, normalize, exclude={"in test"})
    assert column(kept, "text") == ["good film", "bad"]
    assert report == {"rows_in": 8, "empty": 1, "exact_duplicates": 1,
                      "normalized_duplicates": 1, "conflicting_labels": 2,
                      "overlap_with_held_out": 1, "rows_out": 2}


def test_stage_outputs_splits_profile_and_is_deterministic(tmp_path, cfg):
    write_raw(tmp_path / "raw", {"train": synthetic_rows(400)})  # no test: carved out
    profile = preprocess(cfg, 42, raw_dir=tmp_path / "raw", out_dir=tmp_path / "a")
    splits = load_splits(tmp_path / "a")
    assert set(splits) == {"train", "val", "test"}
    assert profile["splits"]["test"]["rows"] == 40 and profile["splits"]["val"]["rows"] == 36
    for split in profile["splits"].values():  # stratified: both classes in every split
        assert abs(split["class_shares"]["pos"] - 0.5) < 0.05
    texts = [set(column(splits[s], "text")) for s in ("train", "val", "test")]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2])
    assert set(profile["splits"]["train"]["tokens"]) >= {"p50", "p95", "p99", "mean", "max"}
    assert profile["top_tokens"][0][1] >= profile["top_tokens"][-1][1]
    assert abs(sum(profile["reference"]["length"]["shares"]) - 1) < 1e-9
    assert profile["data"]["content_hash"] == "abc"
    # the same input and seed give the same split
    preprocess(cfg, 42, raw_dir=tmp_path / "raw", out_dir=tmp_path / "b")
    assert column(load_splits(tmp_path / "b")["test"], "text") == column(splits["test"], "text")


@pytest.mark.parametrize("setup,message", [
    ("unk", "unknown-token rate"),
    ("missing_class", "split 'test': class 'pos' has 0 rows"),
    ("empty_test", "split 'test' is empty"),
])
def test_validation_fails_and_writes_nothing(tmp_path, cfg, setup, message):
    train, test = synthetic_rows(200), synthetic_rows(20, 1)
    if setup == "unk":
        cfg.validation.max_unk_rate = 0.0
        test = [("zzqx ŧħ ßø " + t, y) for t, y in test]  # characters train never saw
    elif setup == "missing_class":
        test = [(t, y) for t, y in test if y == 0]
    else:
        test = [("   ", 0)]
    write_raw(tmp_path / "raw", {"train": train, "test": test})
    with pytest.raises(ValidationError, match=message):
        preprocess(cfg, 42, raw_dir=tmp_path / "raw", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


TRAIN_IN_A_FRESH_PROCESS = """
import gzip, sys
from conftest import compose
from pipeline.preprocess import train_tokenizer
lines = gzip.open("data/external/sst2/train.tsv.gz", "rt").read().splitlines()[1:3001]
cfg = compose("preprocess.tokenizer.type=bpe", "preprocess.tokenizer.vocab_size=2000")
sys.stdout.write(train_tokenizer([line.split("\\t")[0] for line in lines], cfg.preprocess).to_str())
"""


def test_bpe_tokenizer_is_the_same_in_every_run():
    """BPE is the choice for bit-for-bit reproducible runs from nothing. (WordPiece
    training is not: the trainer numbers '##' tokens in hash-map order and breaks
    count ties by those numbers, huggingface/tokenizers#1794.) Hash seeds differ per
    process, so the comparison needs two processes."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    runs = [subprocess.run([sys.executable, "-c", TRAIN_IN_A_FRESH_PROCESS], cwd=ROOT, env=env,
                           capture_output=True, text=True, check=True).stdout for _ in range(2)]
    assert runs[0] == runs[1]
    assert Tokenizer.from_str(runs[0]).get_vocab_size() > 1000
