"""A tiny next-word bundle, built in seconds, for tests that need one served.

A word-level tokenizer (pipeline/tasks/next_word/tokenizer.py) and a small
`DecoderLM` trained to memorise a few short documents, so that greedy decoding of a
document's first words continues it predictably (and by a wide margin, so float noise
from batching never flips a choice), exported with its cache and quantised to int8 as
the deploy stage does (pipeline/tasks/next_word/export.py), beside the bundle.json
fields a next-word bundle needs (serving/bundle/tasks.py). The pipeline is skipped:
no DVC, no MLflow.

`build_bundle(path)` writes it; `DOCUMENTS` are the texts it knows.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import torch
from omegaconf import OmegaConf

from pipeline.data.profile import reference_histogram
from pipeline.tasks.next_word.export import export_onnx, quantize_best
from pipeline.tasks.next_word.models import DecoderLM
from pipeline.tasks.next_word.processed import typed_lengths
from pipeline.tasks.next_word.task import surprisal_reference
from pipeline.tasks.next_word.tokenizer import encode, train_tokenizer
from serving.bundle import Bundle
from serving.bundle.tasks import NEXT_WORD, signature

DOCUMENTS = [
    "the cat sat on the mat and looked at the door until the dog came home .",
    "a bird sang in the tall tree while the children played by the river .",
    "my old friend wrote a long letter about the sea , the ships and the storm .",
    "we walked to the market early and bought bread , cheese and red apples .",
]
MAX_LEN = 32
SIZE = {"d_model": 32, "n_heads": 2, "n_layers": 2, "d_ff": 64}


def train(tokenizer, steps: int = 150, seed: int = 0,
          documents: list[str] = DOCUMENTS) -> DecoderLM:
    """DecoderLM memorising `documents` (words of DOCUMENTS' vocabulary): each is one
    row, [EOS] before it (as after the previous document in a training stream) and
    [EOS] as its last target."""
    torch.manual_seed(seed)
    eos = tokenizer.token_to_id("[EOS]")
    rows = [[eos, *ids, eos] for ids in encode(tokenizer, documents)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width - 1, dtype=torch.long)
    labels = torch.full((len(rows), width - 1), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row) - 1] = torch.tensor(row[:-1])
        labels[i, : len(row) - 1] = torch.tensor(row[1:])
    model = DecoderLM(tokenizer.get_vocab_size(), max_len=MAX_LEN, dropout=0.0, **SIZE)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        logits, _ = model(ids, use_cache=False)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                 ignore_index=-100)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def build_bundle(path: Path, version: str = "tiny-1", model: torch.nn.Module | None = None,
                 documents: list[str] = DOCUMENTS) -> Path:
    """The bundle directory at `path`: tokenizer.json, model.onnx, model.int8.onnx and
    bundle.json. `model`: one to export instead of the trained tiny model (it must take
    the tokenizer's vocabulary); `documents`: what the tiny model memorises instead
    (words of DOCUMENTS, whose vocabulary the tokenizer always learns): another model
    of the same tokenizer, a challenger that answers otherwise where they differ."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.create({"tokenizer": {"type": "word", "vocab_size": 200,
                                          "min_frequency": 1, "lowercase": True}})
    tokenizer = train_tokenizer(DOCUMENTS, cfg)
    tokenizer.save(str(path / "tokenizer.json"))
    model = model or train(tokenizer, documents=documents)
    export_onnx(model, path / "model.onnx", opset=18)
    eos = tokenizer.token_to_id("[EOS]")
    blocks = [[eos, *ids, eos] for ids in encode(tokenizer, DOCUMENTS)]
    int8 = quantize_best(path / "model.onnx", path / "model.int8.onnx", model, blocks, blocks,
                         0)
    session = ort.InferenceSession(str(path / "model.int8.onnx"),
                                   providers=["CPUExecutionProvider"])
    meta = {"task": NEXT_WORD, "version": version, "model_name": "tiny-next-word",
            "label_names": [], "max_len": getattr(model, "max_len", MAX_LEN),
            "cache": "all", "pad_id": 0, "unk_id": 1, "eos_id": eos,
            "special": {"pad_id": 0, "unk_id": 1, "eos_id": eos},
            "signature": signature(session), "quantization": int8,
            # what a /generate request that names none of these decodes with
            "generation": {"max_new_tokens": 6, "temperature": 0.0, "top_k": 0,
                           "top_p": 1.0}}
    (path / "bundle.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    # the drift reference, as preprocess and deploy make it
    lengths = typed_lengths([len(ids) for ids in encode(tokenizer, DOCUMENTS * 25)])
    decoder = Bundle.load(path, precision="fp32").decoder
    meta["profile"] = {"reference": {
        "length": reference_histogram(lengths), "unk_rate": 0.0,
        "surprisal": surprisal_reference(decoder, DOCUMENTS * 25, MAX_LEN)}}
    (path / "bundle.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return path


if __name__ == "__main__":  # python tests/next_word_bundle.py <dir>
    import sys

    print(build_bundle(Path(sys.argv[1])))
