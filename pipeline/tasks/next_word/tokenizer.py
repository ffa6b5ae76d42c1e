"""The language model's tokenizer, trained on the training split only, in one
`tokenizer.json` that the bundle carries and the service loads.

- `word`: lower-cased words (apostrophes inside a word kept: "'tis", "o'", "we'll")
  and punctuation marks, a vocabulary of the words seen at least `min_frequency`
  times, at most `vocab_size` entries with the specials, [UNK] for the rest. Its
  decoder joins words back with serving/bundle/words.py's rules, so `decode` gives
  "first citizen: we'll go, away!" and not a space before every comma.
- `bpe`: byte-level BPE (GPT-2's pre-tokenisation): no text is ever unknown; the
  byte-level decoder restores the spaces exactly.

Both start with the same normalizer (NFKC, lower-casing when `lowercase`, every run of
whitespace one space), saved inside the file, so a prompt reaching the service is
normalised exactly as training text was. The special tokens are [PAD] = 0, [UNK] = 1,
[EOS] = 2 (end of document), and encoding adds none of them. Training is repeatable:
the same texts give the same file, byte for byte, in any process (both trainers in
tokenizers 0.23 break frequency ties by the token itself; tests check it).
"""

from __future__ import annotations

from omegaconf import DictConfig
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from pipeline.tasks.text_classification.tokenizer import (
    EMAIL,
    EMAIL_PATTERN,
    PHONE,
    PHONE_PATTERN,
    URL,
    URL_PATTERN,
)
from serving.bundle.words import word_decoder

# Personal data masked before anything is learnt or logged (URLs first: a URL may hold
# something that looks like an e-mail address)
MASKS = ((URL_PATTERN, URL), (EMAIL_PATTERN, EMAIL), (PHONE_PATTERN, PHONE))

PAD, UNK, EOS = "[PAD]", "[UNK]", "[EOS]"
SPECIAL_TOKENS = [PAD, UNK, EOS]  # ids 0, 1, 2, in this order
# A word: letters, digits, underscores and apostrophes ("'tis", "o'", "we'll" are words
# of their own in Shakespeare); a run of hyphens (a dash, or the joint of "soft-hearted");
# any other single non-space character (punctuation).
WORD_PATTERN = r"[\w']+|-+|[^\w\s]"
TYPES = ("word", "bpe")


def build_normalizer(cfg: DictConfig) -> normalizers.Normalizer:
    steps: list[normalizers.Normalizer] = [normalizers.NFKC()]
    if cfg.tokenizer.get("lowercase", True):
        steps.append(normalizers.Lowercase())
    if cfg.tokenizer.get("mask_pii", True):  # as text classification's: what the log keeps
        steps += [normalizers.Replace(Regex(pattern), f" {placeholder} ")
                  for pattern, placeholder in MASKS]
    steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    return normalizers.Sequence(steps)


def word_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Split on whitespace first: "isolated" keeps what lies between matches as pieces
    # too, and the pattern covers every other character, so nothing else is left over.
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                    pre_tokenizers.Split(Regex(WORD_PATTERN), "isolated")])


def train_tokenizer(texts: list[str], cfg: DictConfig) -> Tokenizer:
    """A `cfg.tokenizer.type` tokenizer trained on `texts` (the training documents)."""
    settings = cfg.tokenizer
    if settings.type not in TYPES:
        raise ValueError(f"preprocess.tokenizer.type: unknown type {settings.type!r} "
                         f"({', '.join(TYPES)})")
    if settings.type == "word":
        tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
        tokenizer.pre_tokenizer = word_pre_tokenizer()
        tokenizer.decoder = word_decoder()
        trainer = trainers.WordLevelTrainer(
            vocab_size=settings.vocab_size, min_frequency=settings.min_frequency,
            special_tokens=SPECIAL_TOKENS, show_progress=False)
    else:
        tokenizer = Tokenizer(models.BPE(unk_token=UNK))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        # The byte-level decoder restores every space, the one add_prefix_space put
        # before the first word too: strip that, so decoding gives the normalised text.
        tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(
            vocab_size=settings.vocab_size, min_frequency=settings.min_frequency,
            special_tokens=SPECIAL_TOKENS, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.normalizer = build_normalizer(cfg)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    if ids != [0, 1, 2]:  # the models and the service take these ids as given
        raise ValueError(f"special tokens got ids {ids}, expected [0, 1, 2]")
    tokenizer.no_padding()
    tokenizer.no_truncation()  # documents are packed into blocks, never cut
    return tokenizer


def encode(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's token ids, no special tokens."""
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
