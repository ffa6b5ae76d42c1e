"""A Transformer encoder classifier, written out with torch.nn.

token embedding + sinusoidal positional encoding -> N pre-norm encoder blocks
(multi-head self-attention and a feed-forward layer, each in a residual connection
with layer norm) -> final layer norm -> masked mean (or [CLS]) pooling -> linear.

Padding never influences a real token: attention masks padded keys and pooling
ignores padded positions, so a text's logits do not depend on how long the other
texts in its batch are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PositionalEncoding(nn.Module):
    """Fixed sinusoidal positions (Vaswani et al., 2017), added to the embeddings."""

    def __init__(self, d_model: int, max_length: int):
        super().__init__()
        position = torch.arange(max_length).unsqueeze(1)
        frequency = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_length, d_model)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency)
        self.register_buffer("table", table, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table[: x.size(1)]


class MultiHeadSelfAttention(nn.Module):
    """`n_heads` heads of `head_dim` each; n_heads x head_dim is d_model unless heads
    were pruned away (pipeline/tasks/text_classification/prune.py), which keeps the
    survivors' width."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, head_dim: int | None = None):
        super().__init__()
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
            head_dim = d_model // n_heads
        self.n_heads, self.head_dim = n_heads, head_dim
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * n_heads * head_dim)
        self.out = nn.Linear(n_heads * head_dim, d_model)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x: (batch, seq, d_model); keep: (batch, seq) bool, False at padding."""
        batch, seq, _ = x.shape
        q, k, v = (
            self.qkv(x).view(batch, seq, 3, self.n_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)  # (3, batch, heads, seq, head_dim)
        )
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=keep[:, None, None, :],  # every query may look at the real keys
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(y.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))


class EncoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float,
                 head_dim: int | None = None):
        super().__init__()
        self.attention_norm = nn.LayerNorm(d_model)
        self.attention = MultiHeadSelfAttention(d_model, n_heads, dropout, head_dim)
        self.feed_forward_norm = nn.LayerNorm(d_model)
        self.feed_forward = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # Pre-norm residuals train stably without a long warm-up.
        x = x + self.dropout(self.attention(self.attention_norm(x), keep))
        return x + self.dropout(self.feed_forward(self.feed_forward_norm(x)))


class TransformerClassifier(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        max_length: int,
        pad_id: int,
        d_model: int = 128,
        n_heads: int = 4,
        n_layers: int = 2,
        d_ff: int = 256,
        dropout: float = 0.1,
        pooling: str = "mean",
        head_dim: int | None = None,  # None: d_model / n_heads
    ):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', not {pooling!r}")
        self.pooling = pooling
        self.scale = math.sqrt(d_model)
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.positions = PositionalEncoding(d_model, max_length)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            EncoderBlock(d_model, n_heads, d_ff, dropout, head_dim) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.classifier = nn.Linear(d_model, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask.bool()
        x = self.dropout(self.positions(self.embedding(input_ids) * self.scale))
        for block in self.blocks:
            x = block(x, keep)
        x = self.norm(x)
        if self.pooling == "cls":
            pooled = x[:, 0]
        else:
            weights = keep.unsqueeze(-1).to(x.dtype)
            pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.classifier(self.dropout(pooled))
