"""The tokenizer: text normalisation, personal-data masking and the vocabulary, in one
`tokenizer.json`.

The normalisation (NFKC, HTML, lower-casing, whitespace) and the masking are the
tokenizer's own normalizer, saved inside the file. Serving loads that file, so it sees
text exactly as training did: there is no second implementation to drift.

Training is repeatable: the same texts give the same file, byte for byte, in any
process (see `repeatable_wordpiece`).
"""

from __future__ import annotations

import json

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


# ---------------------------------------------------------------- vocabulary


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
    tokenizer.normalizer = build_normalizer(cfg)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    pinned = continuation_tokens(tokenizer, texts) if kind == "wordpiece" else []
    trainer = trainer_class(
        vocab_size=cfg.tokenizer.vocab_size,
        min_frequency=cfg.tokenizer.min_frequency,
        special_tokens=SPECIAL_TOKENS + pinned,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if pinned:
        tokenizer = unpin(tokenizer, set(pinned))
    return finish_tokenizer(tokenizer, cfg)


def continuation_tokens(tokenizer: Tokenizer, texts: list[str]) -> list[str]:
    """`##c` for every character that continues a word in `texts`, sorted.

    tokenizers 0.23's WordPiece trainer numbers these in hash-map order, which differs
    from process to process, and breaks ties between equally frequent merges by those
    numbers, so the vocabulary itself changes run to run (huggingface/tokenizers#1794,
    fix not released). Given as special tokens, they are numbered in this order
    instead, and every run makes the same file.
    """
    chars: set[str] = set()
    for text in texts:
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(
                tokenizer.normalizer.normalize_str(text)):
            chars.update(word[1:])
    return [f"##{c}" for c in sorted(chars)]


def unpin(tokenizer: Tokenizer, pinned: set[str]) -> Tokenizer:
    """The pinned `##c` tokens back as plain vocabulary entries: as added tokens they
    would be matched whole in any text, before the model splits words."""
    spec = json.loads(tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in pinned]
    return Tokenizer.from_str(json.dumps(spec))


def pretrained_tokenizer(cfg: DictConfig) -> Tokenizer:
    """A pre-trained model's own tokenizer, with our normalisation and masking put
    around its normalizer, so they still reach serving through tokenizer.json."""
    from pipeline.tasks.text_classification.models.pretrained import tokenizer_file

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
