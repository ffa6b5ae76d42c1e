"""Next-word prediction's preprocess: split the corpus by contiguous blocks of whole
documents, bound the leakage, train the tokenizer on train, and pack every split's
token stream into blocks.

- Splits (splits.py): validation and test the source lacks are carved from train as
  contiguous runs of whole documents, never random lines.
- Leakage (leakage.py): held-out lines of `leakage_min_words` words or more that
  repeat training text, counted with an example and bounded.
- Tokenizer (tokenizer.py): `word` or `bpe`, fitted on the training documents only.
- Blocks: a split's stream is its documents in order, each followed by [EOS]; block
  i is tokens [i*B, i*B + B + 1) of it (B = `block_size`), so consecutive blocks
  overlap by one token and every token but the stream's first is predicted exactly
  once. The last block may be shorter (2 tokens at least).

Output (`data/processed/`): `dataset/` (train / val / test, column `ids`),
`documents/` (the same splits, column `text`: each document normalised as the
tokenizer takes it), `tokenizer.json` and `profile.json`. Nothing is written unless
validation passes, and the same input gives the same bytes in every run.
"""

from __future__ import annotations

import datasets
import numpy as np
from datasets import Dataset, DatasetDict, Features, Value
from omegaconf import DictConfig
from tokenizers import Tokenizer

from pipeline import atomic
from pipeline.config import Paths
from pipeline.data.profile import ValidationError, reference_histogram
from pipeline.data.splits import column, load_dataset_dir
from pipeline.tasks.next_word import leakage, splits
from pipeline.tasks.next_word.processed import typed_lengths
from pipeline.tasks.next_word.tokenizer import EOS, PAD, UNK, encode, train_tokenizer

SPLITS = ("train", "val", "test")
BLOCK_FEATURES = Features({"ids": datasets.List(Value("int64"))})
DOCUMENT_FEATURES = Features({"text": Value("string")})


def stream(ids: list[list[int]], eos_id: int) -> np.ndarray:
    """The documents' token ids in order, each followed by [EOS]."""
    out = np.empty(sum(len(row) + 1 for row in ids), dtype=np.int64)
    at = 0
    for row in ids:
        out[at: at + len(row)] = row
        out[at + len(row)] = eos_id
        at += len(row) + 1
    return out


def pack(tokens: np.ndarray, block_size: int) -> list[np.ndarray]:
    """Blocks of `block_size` + 1 tokens, consecutive ones sharing one: block i's last
    token is block i+1's first, the target of one and the input of the next."""
    if block_size < 1:
        raise ValueError(f"preprocess.block_size: {block_size} (at least 1)")
    count = -(-(len(tokens) - 1) // block_size) if len(tokens) > 1 else 0
    return [tokens[i * block_size: i * block_size + block_size + 1] for i in range(count)]


def split_documents(raw: DatasetDict, cfg: DictConfig, seed: int
                    ) -> tuple[dict[str, dict[str, list]], dict]:
    """Each split's documents (`text`, `place` = (file, first line)), carved from train
    where the source has no such split."""
    def documents(ds: Dataset) -> dict[str, list]:
        return {"text": column(ds, "text"),
                "place": list(zip(column(ds, "file"), column(ds, "source_row"), strict=True))}

    train = documents(raw["train"])
    given = {name for name in ("val", "test") if name in raw}
    words = [len(text.split()) for text in train["text"]]
    places = [f"{file}:{row}" for file, row in train["place"]]
    indices, report = splits.carve(words, places, given, cfg, seed)
    out = {name: documents(raw[name]) for name in given}
    for name, rows in indices.items():
        out[name] = {key: [values[i] for i in rows] for key, values in train.items()}
    if "feedback" in raw:  # users' own text: trained on, never held out (feedback.py)
        found = documents(raw["feedback"])
        out["train"] = {key: out["train"][key] + found[key] for key in found}
        report["feedback_documents"] = len(found["text"])
    return {name: out[name] for name in SPLITS}, report


def split_profile(texts: list[str], ids: list[list[int]], blocks: int, unk_id: int) -> dict:
    text_tokens = sum(len(row) for row in ids)
    return {
        "rows": len(texts),  # documents
        "tokens": text_tokens + len(ids),  # the stream: text tokens and one [EOS] each
        "words": sum(len(text.split()) for text in texts),
        "blocks": blocks,
        # of the text tokens ([EOS] is never unknown)
        "unk_rate": sum(row.count(unk_id) for row in ids) / max(text_tokens, 1),
    }


def validate(profile: dict, cfg: DictConfig) -> None:
    """ValidationError listing every configured anomaly found."""
    bounds = cfg.validation
    problems = []
    for name, split in profile["splits"].items():
        if split["rows"] == 0 or split["blocks"] == 0:
            problems.append(f"split {name!r} is empty ({split['rows']} documents, "
                            f"{split['tokens']} tokens)")
        elif split["unk_rate"] > bounds.max_unk_rate:
            problems.append(f"split {name!r}: unknown-token rate {split['unk_rate']:.4f} "
                            f"over the bound {bounds.max_unk_rate}")
    for name, found in profile["leakage"].items():
        if found["share"] > bounds.max_leakage:
            example = found["example"]
            how = "equals a training line" if example["kind"] == "equal" else \
                "is contained in training text"
            problems.append(
                f"split {name!r}: {found['share']:.1%} of its lines of "
                f"{found['min_words']}+ words ({found['leaked']} of {found['lines']}) repeat "
                f"training text, over the bound {bounds.max_leakage:.1%}; e.g. "
                f"{example['file']}, line {example['source_row']} {example['line']!r} {how} "
                f"({example['train_file']}, document at line {example['train_source_row']})")
    if problems:
        raise ValidationError("; ".join(problems))


def preprocess(cfg: DictConfig, seed: int, paths: Paths) -> dict:
    """Run the stage on `paths.raw`; write `paths.processed` atomically, only if the
    profile passes validation."""
    datasets.disable_progress_bars()
    raw = load_dataset_dir(paths.raw / "dataset")
    manifest = atomic.read_json(paths.raw / "manifest.json")
    docs, splitting = split_documents(raw, cfg, seed)
    if not docs["train"]["text"]:
        raise ValidationError("split 'train' is empty: no documents to train on")

    tokenizer: Tokenizer = train_tokenizer(docs["train"]["text"], cfg)
    normalize = tokenizer.normalizer.normalize_str
    found = {name: leakage.leakage(docs[name]["text"], docs[name]["place"],
                                   docs["train"]["text"], docs["train"]["place"],
                                   normalize, int(cfg.leakage_min_words))
             for name in ("val", "test")}

    unk_id, eos_id = tokenizer.token_to_id(UNK), tokenizer.token_to_id(EOS)
    blocks, documents, split_profiles, lengths = {}, {}, {}, {}
    for name in SPLITS:
        texts = [normalize(text) for text in docs[name]["text"]]
        ids = encode(tokenizer, texts)
        lengths[name] = np.asarray([len(row) for row in ids])
        packed = pack(stream(ids, eos_id), int(cfg.block_size))
        blocks[name] = Dataset.from_dict({"ids": [b.tolist() for b in packed]},
                                         features=BLOCK_FEATURES)
        documents[name] = Dataset.from_dict({"text": texts}, features=DOCUMENT_FEATURES)
        split_profiles[name] = split_profile(texts, ids, len(packed), unk_id)

    # as a service sees them: cut where a writer might pause, and to the context
    typed = np.minimum(typed_lengths(lengths["train"]), int(cfg.block_size) - 1)
    profile = {
        "data": {"name": manifest["name"], "content_hash": manifest["content_hash"]},
        "label_names": [],
        "splits": split_profiles,
        "tokenizer": {"type": str(cfg.tokenizer.type),
                      "vocab_size": tokenizer.get_vocab_size(),
                      "min_frequency": int(cfg.tokenizer.min_frequency)},
        "block_size": int(cfg.block_size),
        "special": {"pad_id": tokenizer.token_to_id(PAD), "unk_id": unk_id,
                    "eos_id": eos_id},
        "splitting": splitting,
        "leakage": found,
        # What the service compares prompts with (drift): the training documents'
        # token lengths, cut as typed text (processed.typed_lengths), and the
        # validation split's unknown-token rate (text the tokenizer never saw, as live
        # prompts are; training text has half as many); deploy adds the surprisal.
        "reference": {"length": reference_histogram(typed),
                      "mean_tokens": float(typed.mean()),
                      "unk_rate": split_profiles["val"]["unk_rate"]},
    }
    validate(profile, cfg)
    with atomic.atomic_dir(paths.processed) as tmp:
        DatasetDict(blocks).save_to_disk(str(tmp / "dataset"))
        DatasetDict(documents).save_to_disk(str(tmp / "documents"))
        tokenizer.save(str(tmp / "tokenizer.json"))
        atomic.write_json(tmp / "profile.json", profile)
    return profile
