"""Word-level tokens back into text: words joined by spaces, punctuation attached.

Next-word prediction's word-level tokenizer (pipeline/tasks/next_word/tokenizer.py)
splits text into lower-cased words (apostrophes inside: "'tis", "o'", "kings'") and
single punctuation marks, and forgets the spaces. Joining its tokens with spaces
gives "first citizen : we'll go , away !"; `detokenize` gives "first citizen: we'll
go, away!":

- no space before closing punctuation (. , ; : ! ? ) ] }) or after an opening bracket;
- a hyphen or dash joins both neighbours ("soft-conscience", "speak--it"), as in the
  corpus;
- anything else, quotes included (a lone '"' cannot tell opening from closing), is a
  word between spaces.

The rules are a `tokenizers` decoder, saved in tokenizer.json, so that
`Tokenizer.decode` gives the same text as `detokenize`: one implementation, which the
pipeline, the bundle and the service share. Numpy-free and torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Regex, decoders

CLOSING = ".,;:!?)]}"
OPENING = "([{"
JOINING = "-"  # joins both sides


def word_decoder() -> decoders.Decoder:
    """The joining rules as a decoder (tokenizer.json's `decoder`)."""
    closing = "".join("\\" + c for c in CLOSING + JOINING)
    opening = "".join("\\" + c for c in OPENING + JOINING)
    return decoders.Sequence([
        decoders.Replace(Regex("^"), " "),  # a space before every token ...
        decoders.Fuse(),  # ... then one string, where neighbours can be seen
        decoders.Replace(Regex(f" (?=[{closing}])"), ""),  # ... but before these
        decoders.Replace(Regex(f"(?<=[{opening}]) "), ""),  # ... and after these
        decoders.Strip(" ", 1, 0),  # and the first token's
    ])


DECODER = word_decoder()


def detokenize(tokens: Sequence[str]) -> str:
    """Word-level tokens as text. Special tokens are kept as given: drop [PAD] and [EOS]
    first where they are not wanted (`Tokenizer.decode` skips them itself)."""
    return DECODER.decode(list(tokens)) if tokens else ""
