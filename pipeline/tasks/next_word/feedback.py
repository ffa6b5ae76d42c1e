"""Production feedback as next-word training text.

A next-word service logs each prompt (the text typed so far, normalised by the
bundle's tokenizer) and a client labels it with the word typed next
(serving/api/feedback.py). The export (`make retrain`, pipeline/data/feedback.py)
snapshots those pairs; here each becomes the text its writer actually wrote, the
prompt and its next word, and only the longest of a run survives: a writer who typed
"the cat sat" labelled "the" with "cat" and "the cat" with "sat" on the way, and
training on every prefix would count their words again and again.

The documents join the training split only (preprocess.py): validation and test stay
the corpus's, so a retrained model is scored on the same text as the champion.
"""

from __future__ import annotations

import re

from pipeline.data.readers import FeedbackRows
from pipeline.tasks.next_word.corpus import Documents

WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> tuple[str, ...]:
    """A text's words and punctuation marks, however they were spaced: "moon," and
    "moon ," are the same text to a writer."""
    return tuple(WORD.findall(text))


def feedback_documents(feedback: FeedbackRows) -> Documents:
    """Each labelled prompt with its next word, as one document, dropping any that a
    longer one continues; in snapshot order, each naming its snapshot line."""
    written = [(f"{text} {label}".strip(), row)
               for text, label, row in zip(feedback.texts, feedback.labels, feedback.rows,
                                           strict=True)]
    ordered = sorted({words(text) for text, _ in written})
    # in sorted order, whatever continues a text comes right after it
    continued = {text for text, after in zip(ordered, ordered[1:], strict=False)
                 if after[:len(text)] == text}
    documents = Documents(feedback.origin, sources=1, sha256=feedback.sha256)
    seen: set[tuple[str, ...]] = set()
    for text, row in written:
        key = words(text)
        if key and key not in continued and key not in seen:
            seen.add(key)
            documents.extend([(row, text)], feedback.origin)
    return documents
