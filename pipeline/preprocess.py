"""preprocess: normalise and mask text, clean and split the rows, train a tokenizer,
tokenize every split and profile the data.

The normalisation (NFKC, HTML, lower-casing, whitespace) and the personal-data masking
are the tokenizer's own normalizer, saved inside `tokenizer.json`. Serving loads that
file, so it sees text exactly as training did: there is no second implementation to
drift.

Output (`data/processed/`): `dataset/` (train / val / test with `input_ids`),
`tokenizer.json`, and `profile.json`: rows, class balance, token lengths, unknown-token
rate and frequent tokens per split, the cleaning counts, and the reference
distributions that the service compares live traffic with.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
from datasets import Dataset, DatasetDict
from omegaconf import DictConfig
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from pipeline import atomic
from pipeline.config import PROCESSED_DIR, RAW_DIR, load_params
from pipeline.splits import column, load_dataset_dir

PAD, UNK, CLS = "[PAD]", "[UNK]", "[CLS]"
SPECIAL_TOKENS = [PAD, UNK, CLS]
# Placeholders for masked personal data. Lower-case on purpose: the tokenizer
# normalises an added token's own text before matching it, and a lower-casing
# normalizer would otherwise turn "[EMAIL]" into something it can never match.
EMAIL, URL, PHONE = "[email]", "[url]", "[phone]"
PLACEHOLDERS = [EMAIL, URL, PHONE]

# A URL runs to the next space; punctuation at its end belongs to the sentence.
URL_PATTERN = r"(?:https?://|www\.)[^\s<>\"']*[^\s<>\"'.,;:!?)\]]"
EMAIL_PATTERN = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
# International (+44 20 7946 0958) and North American ((555) 123-4567) numbers. At
# least one separator is required so that years and plain counts are left alone.
PHONE_PATTERN = (
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{4}(?!\w)"
)
HTML_TAG_PATTERN = r"</?[A-Za-z][^<>]{0,200}>"
# A normalizer is a fixed list of rules (it must round-trip through tokenizer.json),
# so entities are decoded from a table; any other entity becomes a space.
HTML_ENTITIES = {
    "&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&#34;": '"', "&apos;": "'",
    "&#39;": "'", "&#x27;": "'", "&nbsp;": " ", "&#160;": " ", "&ndash;": "-",
    "&mdash;": "-", "&hellip;": "...", "&rsquo;": "'", "&lsquo;": "'", "&ldquo;": '"',
    "&rdquo;": '"',
}
OTHER_ENTITY_PATTERN = r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});"


class ValidationError(ValueError):
    """The processed data has an anomaly that the configuration does not allow."""


# ---------------------------------------------------------------- normalisation


def build_normalizer(cfg: DictConfig, model_normalizer=None) -> normalizers.Normalizer:
    """The text pipeline as tokenizer normalizer rules, in order.

    `model_normalizer` is a pre-trained tokenizer's own normalizer, which runs after
    the clean-up and before the masking so the placeholders survive it.
    """
    steps: list[normalizers.Normalizer] = [normalizers.NFKC()]
    if cfg.strip_html:
        steps.append(normalizers.Replace(Regex(HTML_TAG_PATTERN), " "))
        steps += [normalizers.Replace(entity, text) for entity, text in HTML_ENTITIES.items()]
        steps.append(normalizers.Replace(Regex(OTHER_ENTITY_PATTERN), " "))
    if model_normalizer is not None:
        steps.append(model_normalizer)
    if cfg.lowercase:
        steps.append(normalizers.Lowercase())
    if cfg.mask_pii:
        # URLs first: a URL may contain something that looks like an e-mail address.
        steps.append(normalizers.Replace(Regex(URL_PATTERN), f" {URL} "))
        steps.append(normalizers.Replace(Regex(EMAIL_PATTERN), f" {EMAIL} "))
        steps.append(normalizers.Replace(Regex(PHONE_PATTERN), f" {PHONE} "))
    steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    return normalizers.Sequence(steps)


# ---------------------------------------------------------------- cleaning


def clean_split(ds: Dataset, normalize, exclude: set[str] = frozenset()) -> tuple[Dataset, dict]:
    """Drop empty texts, duplicates and contradictions; count what was dropped.

    - empty: nothing left after normalisation;
    - conflicting_labels: the same normalised text with different labels (all dropped,
      since no label can be trusted);
    - exact_duplicates / normalized_duplicates: a repeat of a kept row, before or after
      normalisation (the first is kept);
    - overlap_with_held_out: texts also in a test or validation split that the source
      provides, dropped so that held-out scores are not inflated by memorised rows.
    """
    texts, labels = column(ds, "text"), column(ds, "label")
    normalized = [normalize(t) for t in texts]
    labels_of: dict[str, set[int]] = {}
    for text, label in zip(normalized, labels, strict=True):
        labels_of.setdefault(text, set()).add(label)
    counts = Counter()
    seen_raw, seen_norm, keep = set(), set(), []
    for i, (raw, norm) in enumerate(zip(texts, normalized, strict=True)):
        if not norm:
            counts["empty"] += 1
        elif len(labels_of[norm]) > 1:
            counts["conflicting_labels"] += 1
        elif norm in exclude:
            counts["overlap_with_held_out"] += 1
        elif raw in seen_raw:
            counts["exact_duplicates"] += 1
        elif norm in seen_norm:
            counts["normalized_duplicates"] += 1
        else:
            keep.append(i)
        seen_raw.add(raw)
        seen_norm.add(norm)
    kinds = ["empty", "exact_duplicates", "normalized_duplicates", "conflicting_labels",
             "overlap_with_held_out"]
    report = {"rows_in": ds.num_rows, **{k: counts[k] for k in kinds}, "rows_out": len(keep)}
    return ds.select(keep), report


def split_rows(
    train: Dataset, test: Dataset | None, val: Dataset | None, cfg: DictConfig, seed: int
) -> DatasetDict:
    """train / val / test. Missing splits are carved from train, stratified by label."""
    if test is None:
        parts = train.train_test_split(
            test_size=cfg.test_fraction, stratify_by_column="label", seed=seed
        )
        train, test = parts["train"], parts["test"]
    if val is None:
        parts = train.train_test_split(
            test_size=cfg.val_fraction, stratify_by_column="label", seed=seed
        )
        train, val = parts["train"], parts["test"]
    return DatasetDict(train=train, val=val, test=test)


# ---------------------------------------------------------------- tokenizer


TOKENIZER_KINDS = {
    "wordpiece": (models.WordPiece, trainers.WordPieceTrainer),
    "bpe": (models.BPE, trainers.BpeTrainer),
}


def train_tokenizer(texts: list[str], cfg: DictConfig) -> Tokenizer:
    """A WordPiece or BPE tokenizer trained on `texts` (the training split only)."""
    kind = cfg.tokenizer.type
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"preprocess.tokenizer.type: unknown type {kind!r} "
                         f"({', '.join(TOKENIZER_KINDS)}, pretrained)")
    model_class, trainer_class = TOKENIZER_KINDS[kind]
    tokenizer = Tokenizer(model_class(unk_token=UNK))
    trainer = trainer_class(
        vocab_size=cfg.tokenizer.vocab_size,
        min_frequency=cfg.tokenizer.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tokenizer.normalizer = build_normalizer(cfg)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return finish_tokenizer(tokenizer, cfg)


def pretrained_tokenizer(cfg: DictConfig) -> Tokenizer:
    """A pre-trained model's own tokenizer, with our normalisation and masking put
    around its normalizer, so they still reach serving through tokenizer.json."""
    from pipeline.models.pretrained import tokenizer_file

    tokenizer = Tokenizer.from_file(str(tokenizer_file(cfg.tokenizer.path)))
    tokenizer.normalizer = build_normalizer(cfg, model_normalizer=tokenizer.normalizer)
    return finish_tokenizer(tokenizer, cfg, own_template=False)


def finish_tokenizer(tokenizer: Tokenizer, cfg: DictConfig, own_template: bool = True
                     ) -> Tokenizer:
    """Placeholders as whole tokens, [CLS] in front, truncation to max_length."""
    if cfg.mask_pii:
        tokenizer.add_tokens([AddedToken(p, normalized=True) for p in PLACEHOLDERS])
    if own_template:  # a pre-trained tokenizer keeps the template its model expects
        cls_id = tokenizer.token_to_id(CLS)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{CLS} $A", special_tokens=[(CLS, cls_id)]
        )
    tokenizer.enable_truncation(max_length=cfg.max_length)
    tokenizer.no_padding()  # batches are padded to their own longest text
    return tokenizer


def build_tokenizer(train_texts: list[str], cfg: DictConfig) -> Tokenizer:
    if cfg.tokenizer.type == "pretrained":
        return pretrained_tokenizer(cfg)
    return train_tokenizer(train_texts, cfg)


def tokenize(splits: DatasetDict, tokenizer: Tokenizer) -> DatasetDict:
    def encode(batch):
        encodings = tokenizer.encode_batch(batch["text"])
        ids = [e.ids for e in encodings]
        return {"input_ids": ids, "length": [len(i) for i in ids]}

    return splits.map(encode, batched=True, batch_size=2048)


# ---------------------------------------------------------------- profile


def length_stats(lengths: np.ndarray) -> dict:
    pcts = np.percentile(lengths, [5, 25, 50, 75, 95, 99])
    stats = {f"p{p}": float(v) for p, v in zip([5, 25, 50, 75, 95, 99], pcts, strict=True)}
    return {**stats, "mean": float(lengths.mean()), "max": int(lengths.max())}


def reference_histogram(lengths: np.ndarray, bins: int = 10) -> dict:
    """Decile bins of the training lengths: the reference for length-drift PSI."""
    edges = np.unique(np.percentile(lengths, np.linspace(0, 100, bins + 1))[1:-1])
    counts = np.bincount(np.searchsorted(edges, lengths, side="right"), minlength=len(edges) + 1)
    return {"edges": edges.tolist(), "shares": (counts / counts.sum()).tolist()}


def profile_split(ds: Dataset, label_names: list[str], unk_id: int, max_length: int) -> dict:
    lengths = np.asarray(column(ds, "length"), dtype=np.int64)
    labels = Counter(column(ds, "label"))
    unk = sum(ids.count(unk_id) for ids in column(ds, "input_ids"))
    return {
        "rows": ds.num_rows,
        "class_counts": {name: labels.get(i, 0) for i, name in enumerate(label_names)},
        "class_shares": {
            name: labels.get(i, 0) / max(ds.num_rows, 1) for i, name in enumerate(label_names)
        },
        "tokens": length_stats(lengths) if len(lengths) else {},
        "truncated_share": float((lengths >= max_length).mean()) if len(lengths) else 0.0,
        "unk_rate": unk / max(int(lengths.sum()), 1),
    }


def build_profile(
    splits: DatasetDict, tokenizer: Tokenizer, label_names: list[str], cfg: DictConfig,
    cleaning: dict, manifest: dict,
) -> dict:
    unk_id = tokenizer.token_to_id(UNK)
    train = splits["train"]
    counter = Counter(token for ids in column(train, "input_ids") for token in ids)
    specials = {tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    top = [(tokenizer.id_to_token(i), n) for i, n in counter.most_common() if i not in specials]
    train_lengths = np.asarray(column(train, "length"))
    class_counts = Counter(column(train, "label"))
    return {
        "data": {"name": manifest["name"], "content_hash": manifest["content_hash"]},
        "label_names": label_names,
        "vocab_size": tokenizer.get_vocab_size(),
        "max_length": cfg.max_length,
        "splits": {
            name: profile_split(ds, label_names, unk_id, cfg.max_length)
            for name, ds in splits.items()
        },
        "cleaning": cleaning,
        "top_tokens": top[:50],
        # What the service compares live traffic with (drift): train-split distributions.
        "reference": {
            "length": reference_histogram(train_lengths),
            "unk_rate": profile_split(train, label_names, unk_id, cfg.max_length)["unk_rate"],
            "class_shares": [class_counts.get(i, 0) / train.num_rows
                             for i in range(len(label_names))],
        },
    }


def validate(profile: dict, cfg: DictConfig) -> None:
    """Raise ValidationError listing every configured anomaly found."""
    problems = []
    for name, split in profile["splits"].items():
        if split["rows"] == 0:
            problems.append(f"split {name!r} is empty")
            continue
        for label, count in split["class_counts"].items():
            if count < cfg.validation.min_rows_per_class:
                problems.append(
                    f"split {name!r}: class {label!r} has {count} rows "
                    f"(minimum {cfg.validation.min_rows_per_class})"
                )
        if split["unk_rate"] > cfg.validation.max_unk_rate:
            problems.append(
                f"split {name!r}: unknown-token rate {split['unk_rate']:.4f} "
                f"over the bound {cfg.validation.max_unk_rate}"
            )
    if problems:
        raise ValidationError("; ".join(problems))


# ---------------------------------------------------------------- the stage


def preprocess(
    cfg: DictConfig, seed: int, raw_dir: Path = RAW_DIR, out_dir: Path = PROCESSED_DIR
) -> dict:
    """Run the whole stage; write `out_dir` atomically, only if validation passes."""
    datasets.disable_progress_bars()
    raw = load_dataset_dir(raw_dir / "dataset")
    manifest = atomic.read_json(raw_dir / "manifest.json")
    label_names = raw["train"].features["label"].names

    # Clean before splitting, so that no text is in two splits.
    normalize = build_normalizer(cfg).normalize_str
    cleaning, given, held_out = {}, {}, set()
    for name in ("test", "val"):  # held-out splits that the source provides
        if name in raw:
            given[name], cleaning[name] = clean_split(raw[name], normalize, held_out)
            held_out |= {normalize(t) for t in column(given[name], "text")}
    train, cleaning["train"] = clean_split(raw["train"], normalize, held_out)
    splits = split_rows(train, given.get("test"), given.get("val"), cfg, seed)
    empty = [name for name, ds in splits.items() if ds.num_rows == 0]
    if empty:
        raise ValidationError("; ".join(f"split {name!r} is empty after cleaning"
                                        for name in empty))

    tokenizer = build_tokenizer(column(splits["train"], "text"), cfg)
    splits = tokenize(splits, tokenizer)
    profile = build_profile(splits, tokenizer, label_names, cfg, cleaning, manifest)
    validate(profile, cfg)

    with atomic.atomic_dir(out_dir) as tmp:
        splits.save_to_disk(str(tmp / "dataset"))
        tokenizer.save(str(tmp / "tokenizer.json"))
        atomic.write_json(tmp / "profile.json", profile)
    return profile


def main() -> None:
    cfg = load_params()
    try:
        profile = preprocess(cfg.preprocess, cfg.seed)
    except ValidationError as err:
        sys.exit(f"preprocess: validation failed: {err}")
    rows = ", ".join(f"{n} {s['rows']}" for n, s in profile["splits"].items())
    print(f"preprocess: {rows} rows; vocabulary {profile['vocab_size']}; "
          f"train unknown-token rate {profile['splits']['train']['unk_rate']:.4f}")


if __name__ == "__main__":
    main()
