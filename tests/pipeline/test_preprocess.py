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

from pipeline.config import Paths
from pipeline.data.cleaning import clean_split
from pipeline.data.grouping import containment_groups, group_roots, leakage
from pipeline.data.profile import ValidationError
from pipeline.data.splits import column, load_splits
from pipeline.tasks.text_classification.preprocess import preprocess
from pipeline.tasks.text_classification.tokenizer import EMAIL, PHONE, URL, build_normalizer


@pytest.fixture
def cfg():
    cfg = compose("experiment=smoke").preprocess
    cfg.tokenizer.type = "wordpiece"  # trained on the test's rows
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
    write_raw(Paths(tmp_path).raw, {"train": synthetic_rows(200), "test": synthetic_rows(40, 1)})
    preprocess(cfg, 42, Paths(tmp_path))
    tokenizer = Tokenizer.from_file(str(Paths(tmp_path).processed / "tokenizer.json"))
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
    kept, normalized, report = clean_split(ds, normalize, exclude={"in test"})
    assert column(kept, "text") == ["good film", "bad"] and normalized == ["good film", "bad"]
    assert report == {"rows_in": 8, "empty": 1, "exact_duplicates": 1,
                      "normalized_duplicates": 1, "conflicting_labels": 2,
                      "overlap_with_held_out": 1, "rows_out": 2}


def test_stage_outputs_splits_profile_and_is_deterministic(tmp_path, cfg):
    first, second = Paths(tmp_path / "a"), Paths(tmp_path / "b")
    for paths in (first, second):
        write_raw(paths.raw, {"train": synthetic_rows(400)})  # no test: carved out
    profile = preprocess(cfg, 42, first)
    splits = load_splits(first.processed)
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
    preprocess(cfg, 42, second)
    assert column(load_splits(second.processed)["test"], "text") == column(splits["test"], "text")


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
    write_raw(Paths(tmp_path).raw, {"train": train, "test": test})
    with pytest.raises(ValidationError, match=message):
        preprocess(cfg, 42, Paths(tmp_path))
    assert not (Paths(tmp_path).processed).exists()


# ---------------------------------------------------------------- groups and leakage


SENTENCE = "the plot is thin but the cast is lovely and the score is superb"


def test_containment_groups_put_each_phrase_with_the_sentence_holding_it():
    texts = [
        "the cast is lovely",                    # 0: inside sentence 3
        "lovely",                                 # 1: inside 0, so inside 3
        "a dull and boring film",                 # 2: a root
        SENTENCE,                                 # 3: a root
        "the cast",                               # 4: inside 0 and 3
        "cast is lov",                            # 5: not whole words: its own root
        "boring film",                            # 6: inside 2
        "a dull , and boring film .",             # 7: 2 but for punctuation
    ]
    assert containment_groups(texts) == [3, 3, 2, 3, 3, 5, 2, 2]


def test_a_groups_root_is_its_row_with_the_most_words():
    """Words, not characters: the root must be the row no other row of its group
    contains, or a held-out root could sit inside a training row."""
    texts = ["the film , truly ! ! ! ! ! ! !", "the film truly shines", "a play"]
    assert group_roots([0, 0, 1], texts) == {0: 1, 1: 2}


def test_leakage_counts_each_kind_and_names_an_example():
    train = [SENTENCE, "an awful , dull film ."]
    found = leakage(["the cast is lovely", SENTENCE, "an awful dull film", "brand new"], train)
    assert (found["rows"], found["equal"], found["contained"], found["near_duplicate"],
            found["leaked"]) == (4, 1, 1, 1, 3)
    assert found["share"] == 0.75
    assert found["example"] == {"kind": "contained", "row": "the cast is lovely",
                                "train_row": SENTENCE}


def phrase_rows(sentences: int) -> list[tuple[str, int]]:
    """Like SST-2's training split: each sentence and phrases cut from it, as rows."""
    rows = []
    for text, label in synthetic_rows(sentences):  # each ends in its own "number<i>"
        words = f"{text} and then some more words".split()
        rows.append((" ".join(words), label))
        rows += [(" ".join(words[k:k + 3]), label) for k in (3, 4, 5)]  # with "number<i>"
    return rows


def test_a_validation_row_inside_a_training_row_fails_the_stage(tmp_path, cfg):
    write_raw(Paths(tmp_path).raw, {"train": phrase_rows(120), "test": synthetic_rows(40, 1)})
    cfg.groups, cfg.held_out_rows = "none", "all"  # rows drawn one by one, as before
    with pytest.raises(ValidationError) as err:
        preprocess(cfg, 42, Paths(tmp_path))
    message = str(err.value)
    assert "split 'val':" in message and "leak from train, over the bound 1.0%" in message
    assert "is contained in training row" in message
    assert not (Paths(tmp_path).processed).exists()


def test_containment_groups_keep_phrases_out_of_validation(tmp_path, cfg):
    write_raw(Paths(tmp_path).raw, {"train": phrase_rows(120), "test": synthetic_rows(40, 1)})
    profile = preprocess(cfg, 42, Paths(tmp_path))
    assert profile["leakage"]["val"]["leaked"] == 0
    assert profile["splitting"]["groups"] == 120
    splits = load_splits(Paths(tmp_path).processed)
    val = column(splits["val"], "text")
    assert len(val) == 12 and all(len(t.split()) > 3 for t in val)  # whole sentences only
    # the phrases of validation sentences are neither scored nor trained on
    train = column(splits["train"], "text")
    assert not [t for t in train if any(f" {t} " in f" {v} " for v in val)]
    assert profile["splitting"]["val_group_members_dropped"] == 12 * 3


def test_training_rows_holding_a_test_row_leave_training(tmp_path, cfg):
    """SST-2's test split holds "bad ."; a training sentence ending in it would make
    that test row a phrase the model was trained on."""
    train = synthetic_rows(200) + [("the cast is stiff or just plain bad .", 0)]
    test = synthetic_rows(40, 1) + [("bad .", 0)]
    write_raw(Paths(tmp_path).raw, {"train": train, "test": test})
    profile = preprocess(cfg, 42, Paths(tmp_path))
    assert profile["splitting"]["train_rows_holding_a_held_out_row"] == 1
    assert profile["leakage"]["test"]["contained"] == 0
    kept = column(load_splits(Paths(tmp_path).processed)["train"], "text")
    assert "the cast is stiff or just plain bad ." not in kept and len(kept) > 150


def test_a_group_column_keeps_every_group_in_one_split(tmp_path, cfg):
    rows = [(f"{text} take {k}", label, f"g{i}")
            for i, (text, label) in enumerate(synthetic_rows(300)) for k in range(3)]
    test = [(text, label, f"t{i}") for i, (text, label) in enumerate(synthetic_rows(30, 1))]
    test[0] = (test[0][0], test[0][1], "g7")  # a group the source also has in train
    write_raw(Paths(tmp_path).raw, {"train": rows, "test": test})
    cfg.held_out_rows = "all"
    profile = preprocess(cfg, 42, Paths(tmp_path))
    splits = load_splits(Paths(tmp_path).processed)
    group_of = {text: group for text, _, group in rows + test}
    groups = {name: {group_of[t] for t in column(ds, "text")} for name, ds in splits.items()}
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
    assert "g7" not in groups["train"]
    assert profile["splitting"]["train_rows_in_a_held_out_group"] == 3
    # 10% of the 150 + 149 groups left, by label, and every row of each
    assert profile["splits"]["val"]["rows"] == (15 + 15) * 3


# ---------------------------------------------------------------- bit for bit


COLLECT_AND_PREPROCESS = """
import sys
from pathlib import Path
from conftest import compose
from pipeline.tasks.text_classification.collect import collect
from pipeline.tasks.text_classification.preprocess import preprocess
from pipeline.config import Paths
cfg = compose("data.max_rows=4000", "preprocess.tokenizer.type=" + sys.argv[2])
paths = Paths(Path(sys.argv[1]))
paths.external.parent.mkdir(parents=True)
paths.external.symlink_to(Path("{root}") / "data/external")
collect(cfg.data, cfg.seed, paths)
preprocess(cfg.preprocess, cfg.seed, paths)
"""


def tree_bytes(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.relative_to(path).parts[0] != "external"}


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer", ["wordpiece", "bpe", "pretrained"])
def test_collect_and_preprocess_repeat_byte_for_byte(tmp_path, tokenizer):
    """Two processes (so two hash seeds, which is what broke WordPiece:
    huggingface/tokenizers#1794) write the very same files."""
    script = COLLECT_AND_PREPROCESS.format(root=ROOT)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    for run, seed in (("a", "1"), ("b", "2")):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / run), tokenizer],
                       cwd=ROOT, env={**env, "PYTHONHASHSEED": seed}, check=True)
    first, second = tree_bytes(tmp_path / "a/data"), tree_bytes(tmp_path / "b/data")
    assert first.keys() == second.keys() and "processed/tokenizer.json" in first
    assert [name for name in first if first[name] != second[name]] == []
    assert Tokenizer.from_str(first["processed/tokenizer.json"].decode()).get_vocab_size() > 1000


# ---------------------------------------------------------------- production feedback

FOOD = {1: "tasty delicious fresh savory yummy".split(),
        0: "bland stale soggy greasy burnt".split()}
DISHES = "soup bread pasta salad curry stew pie".split()


def feedback_rows(n: int, seed: int = 0) -> list[tuple[str, int, str]]:
    """(text, label, request id): food reviews, two texts per request."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FOOD[label], 2) + rng.sample(DISHES, 2)
        rows.append((" ".join(words) + f" dish{i}", label, f"req{i // 2}"))
    return rows


def write_raw_with_feedback(path, train, test, feedback):
    """data/raw as collect writes it with a feedback snapshot: (text, label, request)."""
    from datasets import ClassLabel, DatasetDict, Features, Value, load_from_disk

    base = write_raw(path / "base", {"train": train, "test": test})
    raw = dict(load_from_disk(str(base / "dataset")))
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"]),
                         "source_row": Value("int64"), "request_id": Value("string"),
                         "position": Value("int64")})
    raw["feedback"] = Dataset.from_dict({
        "text": [r[0] for r in feedback], "label": [r[1] for r in feedback],
        "source_row": list(range(1, len(feedback) + 1)),
        "request_id": [r[2] for r in feedback],
        "position": [0] * len(feedback)}, features=features)
    DatasetDict(raw).save_to_disk(str(path / "dataset"))
    (path / "manifest.json").write_text((base / "manifest.json").read_text())


def run_with_feedback(tmp_path, cfg, feedback, seed=42, name="processed"):
    paths = Paths(tmp_path / name)
    raw = paths.raw
    base, test = synthetic_rows(200), synthetic_rows(40, seed=1)
    if feedback:
        write_raw_with_feedback(raw, base, test, feedback)
    else:
        write_raw(raw, {"train": base, "test": test})
    profile = preprocess(cfg, seed, paths)
    return profile, load_splits(paths.processed)


def test_feedback_trains_but_for_a_held_out_slice_by_request(tmp_path, cfg):
    base_text = synthetic_rows(200)[7][0]
    feedback = feedback_rows(100) + [(base_text.upper() + " !", 1, "req-dup")]  # in base
    profile, splits = run_with_feedback(tmp_path, cfg, feedback)
    held, train = splits["feedback_test"], splits["train"]
    assert profile["feedback"]["already_in_base_data"] == 1
    assert profile["feedback"]["held_out"] == held.num_rows > 0
    assert held.num_rows + profile["feedback"]["trained"] == 100
    assert 0.1 < held.num_rows / 100 < 0.3  # feedback_holdout: 0.2
    # no held-out text is trained on, and a request is never split between the two
    train_texts = set(column(train, "text"))
    assert not train_texts & set(column(held, "text"))
    assert not set(column(train, "request_id")) & set(column(held, "request_id"))
    # provenance: every feedback row in train names its request; base rows name none
    trained = [r for r in column(train, "request_id") if r]
    assert len(trained) == profile["feedback"]["trained"]
    base_rows = profile["splits"]["train"]["rows"] - len(trained)
    assert column(train, "request_id").count("") == base_rows
    assert profile["splits"]["feedback_test"]["rows"] == held.num_rows
    assert profile["leakage"]["feedback_test"]["leaked"] == 0
    # the fixed test set is the same as without feedback
    assert column(splits["test"], "text") == column(
        run_with_feedback(tmp_path, cfg, [], name="none")[1]["test"], "text")


def test_the_held_out_slice_is_the_same_for_a_seed_and_moves_with_it(tmp_path, cfg):
    feedback = feedback_rows(100)
    _, first = run_with_feedback(tmp_path, cfg, feedback, name="a")
    _, again = run_with_feedback(tmp_path, cfg, feedback, name="b")
    _, other = run_with_feedback(tmp_path, cfg, feedback, seed=7, name="c")
    held = column(first["feedback_test"], "text")
    assert held == column(again["feedback_test"], "text")
    assert held != column(other["feedback_test"], "text")


def test_feedback_inside_a_training_row_trains_and_is_never_held_out(tmp_path, cfg):
    base = synthetic_rows(200)
    inside = [(" ".join(base[i][0].split()[:3]), base[i][1], f"in{i}") for i in range(0, 60, 2)]
    profile, splits = run_with_feedback(tmp_path, cfg, feedback_rows(60) + inside)
    train = splits["train"]
    base_train = [t for t, r in zip(column(train, "text"), column(train, "request_id"),
                                    strict=True) if not r]
    seen = {text for text, _, _ in inside if any(text in row for row in base_train)}
    assert len(seen) > 20
    assert profile["feedback"]["groups_inside_base_training_rows"] >= len(seen)
    assert not seen & set(column(splits["feedback_test"], "text"))
    assert seen <= set(column(train, "text"))


def test_a_growing_snapshot_keeps_every_feedback_row_on_its_side():
    """The held-out slice is not redrawn when feedback arrives: a row the last model was
    scored on is never trained on by the next, nor the reverse."""
    from pipeline.data.feedback_split import split_feedback

    words = "apple brisk cobalt dune ember fjord gale harbor iris jade".split()
    texts = [f"{a} {b} review number {i}" for i, (a, b) in
             enumerate((a, b) for a in words for b in words)]
    ids = [f"req-{i:03d}" for i in range(len(texts))]
    base = {"train": ["an unrelated base sentence"], "val": [], "test": []}
    held_before, trained_before, _ = split_feedback(ids[:60], texts[:60], base, 0.2, seed=7)
    held_after, trained_after, _ = split_feedback(ids, texts, base, 0.2, seed=7)
    assert 5 <= len(held_before) <= 20 and 10 <= len(held_after) <= 35  # about a fifth
    assert set(held_before) <= set(held_after)
    assert set(trained_before) <= set(trained_after)
    assert split_feedback(ids, texts, base, 0.2, seed=8)[0] != held_after  # the seed decides
