"""Next-word prediction's collect: the configured corpus (conf/data/, e.g.
tiny_shakespeare.yaml) into raw documents and a manifest.

Reading and checking is corpus.py's; a bad file stops the stage naming the file and
line before anything is written.

Output (`data/raw/`): a `datasets.DatasetDict` with the splits the source gives (for
Tiny Shakespeare only `train`; preprocess carves the others), one row per document in
source order: `text` (str, lines joined with LF), `file` (where it was read) and
`source_row` (its first line or row there, 1-based); and `manifest.json`: source,
documents, words, content hash.

With a feedback snapshot (`data.feedback`, written by `make retrain`), a `feedback`
split holds the texts users typed, each completed by the word they typed next
(feedback.py); preprocess trains on it.

`data.max_documents` keeps the first documents of each split, not a seeded sample: a
sample would leave gaps between neighbouring speeches, and the splits are carved from
contiguous runs of them. The seed is therefore unused here.
"""

from __future__ import annotations

import hashlib

import datasets
from datasets import Dataset, DatasetDict, Features, Value
from omegaconf import DictConfig, OmegaConf

from pipeline import atomic
from pipeline.config import Paths
from pipeline.data.readers import CollectError, read_feedback_snapshot
from pipeline.tasks.next_word.corpus import Documents, read_corpus
from pipeline.tasks.next_word.feedback import feedback_documents

__all__ = ["CollectError", "collect"]

FEATURES = Features({"text": Value("string"), "file": Value("string"),
                     "source_row": Value("int64")})


def word_count(texts: list[str]) -> int:
    """Whitespace-separated words: what "about 203,000 words" means for a corpus."""
    return sum(len(text.split()) for text in texts)


def content_hash(splits: dict[str, Documents]) -> str:
    """sha256 over every split's documents: changes exactly when the collected text does."""
    digest = hashlib.sha256()
    for split in sorted(splits):
        for text in splits[split].texts:
            digest.update(f"{split}\t{len(text)}\t{text}\n".encode())
    return digest.hexdigest()


def collect(data: DictConfig, seed: int, paths: Paths) -> dict:
    """Read the corpus, check it, and write `paths.raw` atomically. Relative paths are
    read under `paths.root`. Returns the manifest."""
    datasets.disable_progress_bars()
    if "train" not in data.splits:
        raise CollectError("data.splits must include a `train` split")
    max_documents = data.get("max_documents")
    if max_documents is not None and int(max_documents) < 1:
        raise CollectError(f"data.max_documents: {max_documents} (at least 1, or null: all)")
    splits = {split: docs.head(max_documents)
              for split, docs in read_corpus(data, paths.root).items()}

    source = OmegaConf.to_container(data, resolve=True)
    # Only a merged snapshot is part of what was collected: without one the manifest
    # (and so every output after it) is what it was before feedback existed.
    feedback_config = source.pop("feedback", None)
    feedback = read_feedback_snapshot(feedback_config, paths.root)
    if feedback is not None:  # the texts users wrote, for training (feedback.py)
        splits["feedback"] = feedback_documents(feedback)
        source["feedback"] = feedback_config

    dataset = DatasetDict({
        split: Dataset.from_dict({"text": docs.texts, "file": docs.files,
                                  "source_row": docs.rows}, features=FEATURES)
        for split, docs in splits.items()})
    words = {split: word_count(docs.texts) for split, docs in splits.items()}
    manifest = {
        "name": data.name,
        "source": source,
        "label_names": [],  # no classes: the stages print and carry this for every task
        "splits": {split: {"origin": docs.origin, "files": docs.sources,
                           "rows": len(docs.texts), "words": words[split],
                           "sha256": docs.sha256}
                   for split, docs in splits.items()},
        "documents": sum(len(docs.texts) for docs in splits.values()),
        "words": sum(words.values()),
        "content_hash": content_hash(splits),
    }
    with atomic.atomic_dir(paths.raw) as tmp:
        dataset.save_to_disk(str(tmp / "dataset"))
        atomic.write_json(tmp / "manifest.json", manifest)
    return manifest
