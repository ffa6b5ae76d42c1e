"""transfer: the transfer set a student learns from, with the teacher's logits.

Tang et al. (2019) distil BERT into small networks on the training sentences plus
augmented copies of them, which only the teacher labels: words masked (p 0.1) and
copies cut down to one n-gram of their words (p 0.25, n 1 to 5). Without the copies,
their gain from distillation mostly vanished. Part-of-speech-guided word replacement,
their third rule, needs a tagger this repository does not ship, so it is left out.

Each training sentence keeps its label; each copy gets label -100 (no label, the
teacher's logits only: pipeline/tasks/text_classification/classifier.py). The copies
are drawn from one seeded generator in the split's order, so a seed gives the same
transfer set in every run.
The teacher computes its logits through its bundle's `distill.teacher_precision` model
(int8 ONNX by default, the fastest it has), with a line of progress every 30 s.

Output: `data/transfer/transfer.json` (what was built, from which teacher); with a
teacher, `data/transfer/dataset` (text, input_ids, label, teacher_logits). Without a
teacher (`distill.teacher: null`) only transfer.json, saying so, and the student
trains on the labelled split.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from datasets import Dataset
from omegaconf import DictConfig
from tokenizers import Tokenizer

from pipeline import atomic, logs
from pipeline.config import Paths, load_params
from pipeline.data.splits import NO_LABEL, column, load_splits
from serving.bundle import Bundle, BundleError
from serving.bundle.tensors import in_length_order

MASK_TOKENS = ("[MASK]", "<mask>")  # WordPiece's, BPE's; else the tokenizer's unknown


def mask_token(tokenizer: Tokenizer) -> str:
    """The token a masked word becomes: the vocabulary's mask token if it has one."""
    for token in MASK_TOKENS:
        if tokenizer.token_to_id(token) is not None:
            return token
    unknown = getattr(tokenizer.model, "unk_token", None)
    if unknown is None:
        raise ValueError("the tokenizer has neither a mask nor an unknown token")
    return unknown


def augment(words: list[str], rng: np.random.Generator, mask: str, aug: DictConfig
            ) -> list[str]:
    """One copy: each word masked with p `mask_p`; then, with p `ngram_p`, only a
    random n-gram of it kept (n from 1 to `ngram_max`)."""
    copy = [mask if rng.random() < aug.mask_p else word for word in words]
    if len(copy) > 1 and rng.random() < aug.ngram_p:
        n = int(rng.integers(1, min(aug.ngram_max, len(copy)) + 1))
        start = int(rng.integers(0, len(copy) - n + 1))
        copy = copy[start:start + n]
    return copy


def transfer_texts(texts: list[str], labels: list[int], aug: DictConfig, mask: str,
                   seed: int) -> tuple[list[str], list[int]]:
    """Every sentence with its label, each followed by up to `copies` distinct augmented
    copies (label NO_LABEL); a copy equal to its sentence or an earlier copy is dropped."""
    rng = np.random.default_rng(seed)
    out_texts, out_labels = [], []
    for text, label in zip(texts, labels, strict=True):
        out_texts.append(text)
        out_labels.append(label)
        words, seen = text.split(), {" ".join(text.split())}
        for _ in range(aug.copies):
            copy = " ".join(augment(words, rng, mask, aug))
            if copy and copy not in seen:
                seen.add(copy)
                out_texts.append(copy)
                out_labels.append(NO_LABEL)
    return out_texts, out_labels


def teacher_logits(teacher: Bundle, rows: list[list[int]], batch_size: int,
                   every_s: float = 30.0) -> np.ndarray:
    """The teacher's logits for token id lists, in order, batched by length, in
    chunks so that a line reports the rate and the time left every `every_s` s."""
    width, chunk = len(teacher.label_names), 8192
    out = np.zeros((len(rows), width), dtype=np.float32)
    started = last = time.monotonic()
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        out[start:start + len(part)] = in_length_order(part, batch_size, width, teacher.run)
        now, done = time.monotonic(), start + len(part)
        if now - last >= every_s or done == len(rows):
            last, rate = now, done / (now - started)
            print(f"transfer: teacher logits {done}/{len(rows)} ({done / len(rows):.0%}), "
                  f"{rate:.0f} texts/s, {(len(rows) - done) / rate / 60:.1f} min left",
                  flush=True)
    return out


def build_transfer(cfg: DictConfig, paths: Paths) -> dict:
    """Write the transfer set (or, without a teacher, the note that there is none)."""
    processed, teacher_dir, out_dir = paths.processed, paths.teacher, paths.transfer
    teacher_report = atomic.read_json(teacher_dir / "teacher.json")
    if teacher_report["teacher"] is None:
        report = {"teacher": None}
        with atomic.atomic_dir(out_dir) as tmp:
            atomic.write_json(tmp / "transfer.json", report)
        print("transfer: no teacher, no transfer set")
        return report
    tokenizer = Tokenizer.from_file(str(processed / "tokenizer.json"))
    train = load_splits(processed)["train"]
    aug = cfg.distill.augment
    texts, labels = transfer_texts(column(train, "text"), column(train, "label"), aug,
                                   mask_token(tokenizer), cfg.seed)
    ids = [e.ids for e in tokenizer.encode_batch(texts)]
    teacher = Bundle.load(teacher_dir / "bundle", cfg.distill.teacher_precision)
    print(f"transfer: {train.num_rows} sentences + {len(texts) - train.num_rows} augmented "
          f"copies; logits from the teacher {teacher.version} ({teacher.precision})",
          flush=True)
    logits = teacher_logits(teacher, ids, cfg.distill.teacher_batch_size)
    labelled = np.array(labels) != NO_LABEL
    agreement = float((logits[labelled].argmax(1) == np.array(labels)[labelled]).mean())
    report = {"teacher": teacher_report["teacher"], "teacher_version": teacher.version,
              "teacher_precision": teacher.precision, "seed": cfg.seed,
              "augment": dict(aug), "rows": len(texts), "labelled_rows": int(labelled.sum()),
              "augmented_rows": int((~labelled).sum()),
              "teacher_train_accuracy": agreement}
    dataset = Dataset.from_dict({"text": texts, "input_ids": ids, "label": labels,
                                 "teacher_logits": logits.tolist()})
    with atomic.atomic_dir(out_dir) as tmp:
        dataset.save_to_disk(str(tmp / "dataset"))
        atomic.write_json(tmp / "transfer.json", report)
    print(f"transfer: {len(texts)} rows; the teacher agrees with "
          f"{agreement:.1%} of the training labels", flush=True)
    return report


def main() -> None:
    logs.quiet()
    try:
        build_transfer(load_params(), Paths())
    except (BundleError, FileNotFoundError) as err:
        sys.exit(f"transfer: {err}")


if __name__ == "__main__":
    main()
