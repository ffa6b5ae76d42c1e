"""A next-word bundle's text side: texts to token ids and back through its
tokenizer.json, with the special tokens bundle.json names checked on load
(serving/bundle/decoding.py decodes with it)."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from pathlib import Path

from tokenizers import Tokenizer

SPECIALS = {"pad_id": "[PAD]", "unk_id": "[UNK]", "eos_id": "[EOS]"}


class NextWordInputs:
    """Texts to word ids and back, through the bundle's tokenizer.json (word level;
    [PAD] 0, [UNK] 1, [EOS] 2, the end of a document)."""

    def __init__(self, path: Path, meta: dict):
        tokenizer_file = Path(path) / "tokenizer.json"
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # tokenizers raises a bare Exception
            raise ValueError(f"{tokenizer_file}: cannot load ({err})") from None
        special = meta.get("special", {})
        for key, token in SPECIALS.items():
            found = self.tokenizer.token_to_id(token)
            if found is None or found != special.get(key, found):
                raise ValueError(f"{tokenizer_file}: {token} is id {found}, bundle.json's "
                                 f"special.{key} says {special.get(key)}")
            setattr(self, key, found)
        self.vocab_size = self.tokenizer.get_vocab_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Word ids, normalised exactly as in training, without special tokens."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def words(self, ids: Seq[int]) -> list[str]:
        """Each id as text on its own: a word (word level), or a BPE piece without its
        byte-level space marker."""
        return [self.tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]

    def decode(self, ids: Seq[int]) -> str:
        """The text of token ids through tokenizer.json's own decoder (word level:
        punctuation attached, serving/bundle/words.py; BPE: bytes joined back), [UNK]
        kept visible; padding and end-of-document markers are not text."""
        return self.tokenizer.decode([int(i) for i in ids if i not in (self.pad_id, self.eos_id)],
                                     skip_special_tokens=False)
