"""next_word's collect and preprocess on a few speeches: documents read from every
format, splits carved by whole contiguous documents, the leakage rule, repeatable
tokenizers, blocks packed as the models read them, and bad input named precisely."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT
from datasets import load_from_disk
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from pipeline.config import Paths
from pipeline.data.profile import ValidationError
from pipeline.data.readers import CollectError
from pipeline.data.splits import column
from pipeline.tasks.next_word.collect import collect
from pipeline.tasks.next_word.leakage import leakage
from pipeline.tasks.next_word.preprocess import pack, preprocess
from pipeline.tasks.next_word.tokenizer import build_normalizer, train_tokenizer
from serving.bundle.words import detokenize

SPEAKERS = ["ROMEO:", "JULIET:", "First Citizen:", "MENENIUS:"]
WORDS = ("rose name sweet night love moon swear light fair heart eyes death "
         "crown sword lord king grace blood tears hope")


def speech(i: int) -> str:
    """A speech of three lines, each naming the speech, so a split's lines can be
    traced back to the speech they belong to."""
    words = WORDS.split()
    return "\n".join([SPEAKERS[i % len(SPEAKERS)]] + [
        f"Speech {i} line {k}: my {words[(i + k) % len(words)]}, and thy "
        f"{words[(3 * i + k) % len(words)]}!" for k in range(1, 4)])


def corpus(count: int = 40) -> str:
    return "\n\n".join(speech(i) for i in range(count)) + "\n"


def data_cfg(**overrides):
    cfg = OmegaConf.load(ROOT / "conf/data/tiny_shakespeare.yaml")
    cfg.splits = {"train": "data/external/corpus.txt.gz"}
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def prep_cfg(**overrides):
    cfg = OmegaConf.create({
        "val_fraction": 0.1, "test_fraction": 0.1, "split_blocks": 10, "block_size": 16,
        "tokenizer": {"type": "word", "vocab_size": 8000, "min_frequency": 1,
                      "lowercase": True},
        "leakage_min_words": 5,
        "validation": {"max_leakage": 0.02, "max_unk_rate": 0.5}})
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def write(root, name, data: bytes):
    path = root / "data/external" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def collected(tmp_path, text: str = None, **overrides):
    write(tmp_path, "corpus.txt.gz", gzip.compress((text or corpus()).encode()))
    return collect(data_cfg(**overrides), 42, Paths(tmp_path))


def processed(tmp_path, **overrides):
    profile = preprocess(prep_cfg(**overrides), 42, Paths(tmp_path))
    return profile, {name: load_from_disk(str(tmp_path / "data/processed" / name))
                     for name in ("dataset", "documents")}


# ---------------------------------------------------------------- collect


def test_speeches_are_blank_line_blocks_of_a_gzip_file(tmp_path):
    manifest = collected(tmp_path, "\n\n" + corpus(5).replace("\n\n", "\n \n\n"))
    raw = load_from_disk(str(tmp_path / "data/raw/dataset"))["train"]
    assert column(raw, "text") == [speech(i) for i in range(5)]  # speaker line included
    assert column(raw, "source_row")[:2] == [3, 9]  # where each speech starts
    assert manifest["documents"] == 5
    assert manifest["words"] == sum(len(speech(i).split()) for i in range(5))
    assert manifest["splits"]["train"]["rows"] == 5
    # smoke runs keep the first documents: a contiguous run
    small = collect(data_cfg(max_documents=2), 42, Paths(tmp_path))
    raw = load_from_disk(str(tmp_path / "data/raw/dataset"))["train"]
    assert column(raw, "text") == [speech(0), speech(1)]
    assert small["content_hash"] != manifest["content_hash"]


def test_one_document_per_file_or_per_line(tmp_path):
    for name in ("b.txt", "a.txt", "c.md"):
        write(tmp_path, f"plays/{name}", f"{name} first\n\n{name} second\n".encode())
    collect(data_cfg(splits={"train": "data/external/plays/*.txt"}, document="file"), 42,
            Paths(tmp_path))
    raw = load_from_disk(str(tmp_path / "data/raw/dataset"))["train"]
    assert column(raw, "text") == ["a.txt first\n\na.txt second", "b.txt first\n\nb.txt second"]
    assert column(raw, "file") == ["data/external/plays/a.txt", "data/external/plays/b.txt"]
    collect(data_cfg(splits={"train": "data/external/plays/a.txt"}, document="row"), 42,
            Paths(tmp_path))
    raw = load_from_disk(str(tmp_path / "data/raw/dataset"))["train"]
    assert column(raw, "text") == ["a.txt first", "a.txt second"]
    assert column(raw, "source_row") == [1, 3]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_tables_read_their_text_column(tmp_path, fmt):
    rows = [{"id": 1, "body": "To be, or not to be"}, {"id": 2, "body": "that is the question"}]
    if fmt == "jsonl":
        data = "\n".join(json.dumps(r) for r in rows).encode()
    elif fmt == "csv":
        data = ("id,body\n" + "".join(f'{r["id"]},"{r["body"]}"\n' for r in rows)).encode()
    else:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        data = sink.getvalue().to_pybytes()
    write(tmp_path, f"t.{fmt}", data)
    manifest = collect(data_cfg(splits={"train": f"data/external/t.{fmt}"}, text_column="body",
                                document="row"), 42, Paths(tmp_path))
    raw = load_from_disk(str(tmp_path / "data/raw/dataset"))["train"]
    assert column(raw, "text") == [r["body"] for r in rows]
    assert manifest["words"] == 10


@pytest.mark.parametrize("name,data,overrides,message", [
    ("bad.txt", b"ROMEO:\nfair\n\nJULIET:\nsweet \xff night\n", {},
     r"bad\.txt, line 5: bytes that are not UTF-8"),
    ("blank.txt", b"\n  \n\n", {}, r"blank\.txt: empty file"),
    ("t.jsonl", b'{"text": "a b"}\n{"body": "c d"}\n', {},
     r"t\.jsonl, line 2: no column 'text'"),
])
def test_bad_input_names_file_and_line_and_writes_nothing(tmp_path, name, data, overrides,
                                                          message):
    collected(tmp_path)  # an earlier good run: left as it was
    before = (tmp_path / "data/raw/manifest.json").read_bytes()
    write(tmp_path, name, data)
    cfg = data_cfg(splits={"train": f"data/external/{name}"}, **overrides)
    with pytest.raises(CollectError, match=message):
        collect(cfg, 42, Paths(tmp_path))
    assert (tmp_path / "data/raw/manifest.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["external", "raw"]


# ---------------------------------------------------------------- splits and leakage


def test_splits_are_contiguous_runs_of_whole_speeches(tmp_path):
    collected(tmp_path, corpus(40))
    profile, out = processed(tmp_path)
    docs = {name: column(out["documents"][name], "text") for name in ("train", "val", "test")}
    numbers = {name: [int(text.split("speech ")[1].split()[0]) for text in texts]
               for name, texts in docs.items()}
    # every speech in exactly one split, whole: its three lines together
    assert sorted(sum(numbers.values(), [])) == list(range(40))
    for name, texts in docs.items():
        for n, text in zip(numbers[name], texts, strict=True):
            assert [f"speech {n} line {k}" in text for k in (1, 2, 3)] == [True] * 3
    # held out by runs of neighbouring speeches (4 each: 40 speeches in 10 runs), in order
    for name in ("val", "test"):
        assert len(numbers[name]) == 4 == profile["splits"][name]["rows"]
        assert numbers[name] == list(range(numbers[name][0], numbers[name][0] + 4))
        assert profile["splitting"][name]["blocks"][0]["from"].endswith(
            f":{1 + 5 * numbers[name][0]}")  # where the run starts in the file
    assert numbers["train"] == sorted(numbers["train"])
    # the seed chooses the runs
    other = preprocess(prep_cfg(), 7, Paths(tmp_path))["splitting"]
    assert [other[n]["blocks"] for n in ("val", "test")] != \
        [profile["splitting"][n]["blocks"] for n in ("val", "test")]


def test_leakage_counts_repeated_lines_but_not_speaker_lines():
    normalize = build_normalizer(prep_cfg()).normalize_str
    train = ["ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east.",
             "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?"]
    held = ["ROMEO:\nIt is the east.\nBUT SOFT what light through yonder window breaks",
            "JULIET:\nwherefore art thou Romeo? Deny thy father",
            "ROMEO:\nwhat light through yonder window"]
    places = [("play.txt", 10 * i + 1) for i in range(3)]
    found = leakage(held, places, train, places[:2], normalize, min_words=5)
    # "ROMEO:" everywhere and the 4-word "It is the east." are not counted
    assert found["lines"] == 3 and found["short_lines_skipped"] == 4
    # one equal (case and punctuation aside), one inside a longer training line; the
    # line that goes on past the training text is new
    assert (found["equal"], found["contained"], found["leaked"]) == (1, 1, 2)
    assert found["share"] == 2 / 3
    assert found["example"] == {
        "kind": "equal", "line": "BUT SOFT what light through yonder window breaks",
        "file": "play.txt", "source_row": 3, "train_file": "play.txt",
        "train_source_row": 1, "train_text": train[0]}
    assert leakage(held, places, train, places[:2], normalize, min_words=4)["leaked"] == 3


def test_leakage_over_the_bound_stops_and_writes_nothing(tmp_path):
    # every speech twice: whatever is held out, its copy is trained on
    collected(tmp_path, corpus(20) + "\n" + corpus(20))
    with pytest.raises(ValidationError, match=r"split '(val|test)': 100\.0% of its lines of "
                                              r"5\+ words .* e\.g\. data/external/corpus"):
        preprocess(prep_cfg(), 42, Paths(tmp_path))
    assert not (tmp_path / "data/processed").exists()
    assert preprocess(prep_cfg(validation={"max_leakage": 1.0, "max_unk_rate": 0.5}), 42,
                      Paths(tmp_path))["leakage"]["val"]["share"] == 1.0


# ---------------------------------------------------------------- tokenizer and blocks


TRAIN_TEXTS = [speech(i) for i in range(12)] + ["O Romeo, Romeo! wherefore art thou Romeo?"]
REPEAT = """
import sys
from omegaconf import OmegaConf
from pipeline.tasks.next_word.tokenizer import train_tokenizer
cfg = OmegaConf.create({"tokenizer": {"type": sys.argv[1], "vocab_size": 300,
                                      "min_frequency": 2, "lowercase": True}})
sys.stdout.write(train_tokenizer(sys.argv[2:], cfg).to_str())
"""


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_tokenizer_repeats_byte_for_byte_in_another_process(kind):
    runs = [subprocess.run([sys.executable, "-c", REPEAT, kind, *TRAIN_TEXTS], cwd=ROOT,
                           capture_output=True, check=True).stdout for _ in range(2)]
    assert runs[0] == runs[1]
    spec = json.loads(runs[0])
    assert [t["content"] for t in spec["added_tokens"]] == ["[PAD]", "[UNK]", "[EOS]"]
    assert [t["id"] for t in spec["added_tokens"]] == [0, 1, 2]


def test_word_vocabulary_and_decoding():
    cfg = prep_cfg(tokenizer={"type": "word", "vocab_size": 8000, "min_frequency": 2,
                              "lowercase": True})
    tokenizer = train_tokenizer(TRAIN_TEXTS, cfg)
    encoding = tokenizer.encode("ROMEO, thy SPEECH wherefore Zounds!")
    # lower-cased, punctuation apart, no specials added; seen once or never -> [UNK]
    assert encoding.tokens == ["romeo", ",", "thy", "speech", "[UNK]", "[UNK]", "!"]
    assert encoding.ids[4] == 1
    assert tokenizer.token_to_id("wherefore") is None  # seen once only
    tokens = ["first", "citizen", ":", "we'll", "go", ",", "(", "soft", "-", "hearted", ")",
              "--", "away", "!"]
    assert detokenize(tokens) == "first citizen: we'll go, (soft-hearted)--away!"
    ids = tokenizer.encode("romeo: my love, and thy sweet heart!").ids
    assert tokenizer.decode(ids) == "romeo: my love, and thy sweet heart!"
    assert tokenizer.decode(ids) == detokenize([tokenizer.id_to_token(i) for i in ids])
    bpe = train_tokenizer(TRAIN_TEXTS, prep_cfg(tokenizer={
        "type": "bpe", "vocab_size": 400, "min_frequency": 2, "lowercase": True}))
    text = "O Romeo, Zounds!  thy  rose"
    assert bpe.decode(bpe.encode(text).ids) == "o romeo, zounds! thy rose"  # normalised


def test_pack_overlaps_blocks_by_one_token():
    tokens = np.arange(10)
    assert [b.tolist() for b in pack(tokens, 4)] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
    assert [b.tolist() for b in pack(tokens[:9], 4)] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]
    assert pack(tokens[:1], 4) == []


def test_blocks_are_the_split_stream_with_eos_after_each_document(tmp_path):
    collected(tmp_path, corpus(40))
    profile, out = processed(tmp_path)
    tokenizer = Tokenizer.from_file(str(tmp_path / "data/processed/tokenizer.json"))
    for name in ("train", "val", "test"):
        blocks = column(out["dataset"][name], "ids")
        # B + 1 tokens, the last block 2 at least, consecutive ones sharing one token
        assert all(len(b) == 17 for b in blocks[:-1]) and 2 <= len(blocks[-1]) <= 17
        assert all(a[-1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
        tokens = blocks[0] + [t for b in blocks[1:] for t in b[1:]]
        documents = column(out["documents"][name], "text")
        expected = [t for text in documents for t in tokenizer.encode(text).ids + [2]]
        assert tokens == expected  # every document, in order, each closed by [EOS]
        assert profile["splits"][name]["tokens"] == len(expected)
        assert profile["splits"][name]["blocks"] == len(blocks)
    assert documents[0].startswith("romeo: speech")  # normalised as the tokenizer takes it
    assert profile["special"] == {"pad_id": 0, "unk_id": 1, "eos_id": 2}


def test_preprocess_writes_the_same_bytes_every_run(tmp_path):
    collected(tmp_path, corpus(40))

    def digests():
        preprocess(prep_cfg(), 42, Paths(tmp_path))
        root = tmp_path / "data/processed"
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    first = digests()
    assert {"tokenizer.json", "profile.json"} <= set(first)
    assert digests() == first


def test_a_hub_data_set_by_its_splits(tmp_path, monkeypatch):
    """The Hub reader on a local data set directory (what load_dataset takes for an id),
    wikitext-like: one row per line, blank rows between paragraphs."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    hub = tmp_path / "hub"
    hub.mkdir()
    lines = ["To be, or not to be:", "that is the question.", "", "Ay, there's the rub."]
    for split in ("train", "test"):
        (hub / f"{split}.jsonl").write_text("".join(json.dumps({"line": t}) + "\n" for t in lines))
    cfg = data_cfg(source="hub", path=str(hub), text_column="line",
                   splits={"train": "train", "test": "test"})
    manifest = collect(cfg, 42, Paths(tmp_path))
    raw = load_from_disk(str(tmp_path / "data/raw/dataset"))
    assert column(raw["test"], "text") == ["To be, or not to be:\nthat is the question.",
                                           "Ay, there's the rub."]
    assert column(raw["test"], "source_row") == [1, 4]
    assert manifest["splits"]["train"]["rows"] == 2
    with pytest.raises(CollectError, match=r"hub\[test\]: no column 'text'"):
        collect(data_cfg(source="hub", path=str(hub), splits={"test": "test",
                                                              "train": "train"}),
                42, Paths(tmp_path))


# ---------------------------------------------------------------- production feedback


def snapshot(root, rows: list[tuple[str, str]]) -> str:
    """A feedback snapshot as `make retrain` exports it: (prompt, word typed next)."""
    path = root / "data/feedback/labelled.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"request_id": f"r{i}", "position": 0, "text": text,
                                        "label": label, "created": 1000.0 + i}) + "\n"
                            for i, (text, label) in enumerate(rows)))
    return "data/feedback/labelled.jsonl"


def test_feedback_trains_on_what_users_wrote_and_never_on_held_out_text(tmp_path):
    # a writer typing "o gentle moon, be kind" labelled each prefix with its next word
    # (as a client sends them: no space before a comma)
    typed = [("o", "gentle"), ("o gentle", "moon"), ("o gentle moon", ","),
             ("o gentle moon,", "be"), ("o gentle moon, be", "kind"),
             ("farewell", "sweet"), ("farewell", "sweet")]  # a label sent twice
    path = snapshot(tmp_path, typed)
    plain = collected(tmp_path)
    plain_profile, plain_out = processed(tmp_path)
    manifest = collected(tmp_path, **{"feedback": {"snapshot": path}})
    # only the whole text of each run, once: its prefixes would count its words again
    raw = load_from_disk(str(tmp_path / "data/raw/dataset"))
    assert column(raw["feedback"], "text") == ["o gentle moon, be kind", "farewell sweet"]
    assert column(raw["feedback"], "source_row") == [5, 7]  # their snapshot lines
    assert manifest["splits"]["feedback"]["rows"] == 2
    assert manifest["content_hash"] != plain["content_hash"]
    profile, out = processed(tmp_path)
    train = column(out["documents"]["train"], "text")
    assert train[-2:] == ["o gentle moon, be kind", "farewell sweet"]
    assert profile["splitting"]["feedback_documents"] == 2
    # validation and test are the corpus's, carved as before
    for name in ("val", "test"):
        assert column(out["documents"][name], "text") == \
            column(plain_out["documents"][name], "text")
    assert profile["splits"]["train"]["rows"] == plain_profile["splits"]["train"]["rows"] + 2
