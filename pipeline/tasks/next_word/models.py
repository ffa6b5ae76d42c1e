"""Next-word language models, chosen by `model.name` in conf/model/ (lm_transformer,
lm_lstm), written with torch.nn like the classification encoder.

Both map (input_ids, attention_mask, past) to (logits, present), the contract that
export, the bundle's decoding loop and evaluation rely on:

- input_ids int64 [b, t]; attention_mask int64 [b, past_len + t], 1 on real tokens
  (None: all real); past float32 [n_layers, 2, b, H, past_len, Dh] or None (nothing
  before these tokens);
- logits float32 [b, t, vocab] for the token after each position; present: past with
  this call's entries appended along past_len, so each generated token costs one step.

DecoderLM caches keys and values (H = n_heads, Dh = d_model / n_heads). LSTMLM caches
the (h, c) state after each position (H = 1, Dh = d_model); the state before a new
token is past's last entry, so a batch's caches line up by padding them on the *left*.
A padded position (mask 0) never influences a real one: attention skips padded keys,
the LSTM carries its state across them, and a token's position counts only the real
tokens before it, so a left-padded prompt gets the same logits as alone.

A position never sees a later one (causal attention; the LSTM reads left to right).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("lm_transformer", "lm_lstm")


def full_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              past_len: int) -> torch.Tensor:
    """The [b, past_len + t] mask, all ones where the caller gave none."""
    if attention_mask is not None:
        return attention_mask
    return torch.ones(input_ids.shape[0], past_len + input_ids.shape[1],
                      dtype=torch.int64, device=input_ids.device)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention over the cached keys and values and this call's."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"model.d_model: {d_model} is not divisible by "
                             f"model.n_heads {n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None,
                past: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [b, t, d]; allowed [b, 1, t, past_len + t] bool, or None for plain causal
        attention with no past; past [2, b, H, past_len, Dh]. Returns the output and
        this layer's present [2, b, H, past_len + t, Dh]."""
        batch, seq, _ = x.shape
        q, k, v = (self.qkv(x).view(batch, seq, 3, self.n_heads, self.head_dim)
                   .permute(2, 0, 3, 1, 4))  # each [b, H, t, Dh]
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        dropout = self.dropout if self.training else 0.0
        if allowed is None:
            # training's case (no padding, no cache): the fused causal kernel
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)
        return self.out(y), torch.stack([k, v])


class DecoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.attention_norm = nn.LayerNorm(d_model)
        self.attention = CausalSelfAttention(d_model, n_heads, dropout)
        self.feed_forward_norm = nn.LayerNorm(d_model)
        self.feed_forward = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, allowed, past):
        # Pre-norm residuals, as the encoder: stable without a long warm-up.
        y, present = self.attention(self.attention_norm(x), allowed, past)
        x = x + self.dropout(y)
        return x + self.dropout(self.feed_forward(self.feed_forward_norm(x))), present


class DecoderLM(nn.Module):
    """Token and learned position embeddings, pre-norm decoder blocks, a final layer
    norm and an output layer tied to the token embedding (GPT-2's layout)."""

    def __init__(self, vocab_size: int, d_model: int = 256, n_heads: int = 4,
                 n_layers: int = 2, d_ff: int = 1024, max_len: int = 256,
                 dropout: float = 0.1):
        super().__init__()
        self.n_layers, self.max_len = n_layers, max_len
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(max_len, d_model)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(DecoderBlock(d_model, n_heads, d_ff, dropout)
                                    for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.apply(self._init)
        # GPT-2: each residual branch's last layer scaled down by the depth, so the sum
        # of 2 x n_layers branches keeps the residual stream's scale at the start.
        for block in self.blocks:
            for layer in (block.attention.out, block.feed_forward[-1]):
                nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past: torch.Tensor | None = None, use_cache: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """See the module docstring; `use_cache=False` (training) returns no present.
        Positions must stay below max_len (the caller bounds prompt + new tokens)."""
        seq = input_ids.shape[1]
        past_len = 0 if past is None else past.shape[4]
        if attention_mask is None and past is None:
            allowed = None  # plain causal attention, positions 0..t-1
            positions = torch.arange(seq, device=input_ids.device)[None, :]
        else:
            mask = full_mask(input_ids, attention_mask, past_len)
            total = mask.shape[1]
            # a token's position is the number of real tokens before it, so left
            # padding does not shift a prompt (clamped: a left pad itself gets 0)
            # (narrow and arange rather than slices: their lengths stay `seq` when
            # exported, where a slice's length would be data-dependent)
            positions = (mask.cumsum(-1) - 1).clamp(min=0).narrow(1, total - seq, seq)
            keys = torch.arange(total, device=input_ids.device)
            queries = torch.arange(seq, device=input_ids.device) + (total - seq)
            causal = keys[None, :] <= queries[:, None]  # [t, total]
            allowed = causal[None, None] & mask.bool()[:, None, None, :]
            # every query also sees itself: a padded query would otherwise see no key
            # at all (softmax of nothing is NaN); what it computes is never read
            allowed = allowed | (keys[None, :] == queries[:, None])[None, None]
        x = self.dropout(self.embedding(input_ids) + self.positions(positions))
        presents = []
        for layer, block in enumerate(self.blocks):
            x, present = block(x, allowed, None if past is None else past[layer])
            presents.append(present)
        logits = F.linear(self.norm(x), self.embedding.weight)
        return logits, torch.stack(presents) if use_cache else None


class LSTMLM(nn.Module):
    """Embedding, an LSTM of width d_model and an output layer tied to the embedding
    (Press & Wolf, 2017), with dropout on the embeddings, between layers and before
    the output (Zaremba et al., 2014).

    Training (no mask, no past, no cache wanted) runs nn.LSTM over the whole block;
    everything else runs the same weights one position at a time, which gives the
    state after every position for the cache and lets padded positions carry the
    state unchanged. The step loop is Python, so an exported graph is unrolled to the
    example's number of tokens: export the one-token decoding step (prompts then go
    through it a token at a time, which for an LSTM costs the same)."""

    def __init__(self, vocab_size: int, d_model: int = 256, n_layers: int = 2,
                 dropout: float = 0.4):
        super().__init__()
        self.n_layers, self.d_model = n_layers, d_model
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.lstm = nn.LSTM(d_model, d_model, n_layers, batch_first=True,
                            dropout=dropout if n_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        # Between N(0, 1), whose tied output's first logits are huge, and the usual
        # U(-0.1, 0.1), from which Adam took ~150 steps to leave the unigram plateau
        # on Tiny Shakespeare (loss 6.1 there against 5.5 from this, measured)
        nn.init.normal_(self.embedding.weight, std=0.2)

    def _cell(self, layer: int, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        """One step of `layer` with nn.LSTM's own weights (gate order i, f, g, o)."""
        gates = (F.linear(x, getattr(self.lstm, f"weight_ih_l{layer}"),
                          getattr(self.lstm, f"bias_ih_l{layer}"))
                 + F.linear(h, getattr(self.lstm, f"weight_hh_l{layer}"),
                            getattr(self.lstm, f"bias_hh_l{layer}")))
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past: torch.Tensor | None = None, use_cache: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.dropout(self.embedding(input_ids))
        if attention_mask is None and past is None and not use_cache:
            states, _ = self.lstm(x)
            return F.linear(self.dropout(states), self.embedding.weight), None
        batch, seq = input_ids.shape
        if past is None:
            past = x.new_zeros(self.n_layers, 2, batch, 1, 0, self.d_model)
        mask = full_mask(input_ids, attention_mask, past.shape[4])
        keep = mask.narrow(1, mask.shape[1] - seq, seq).bool()[:, :, None]  # [b, t, 1]
        # the state before the first new token: past's last entry, zeros if it has none
        # (a zero entry in front makes both one indexing, with no branch on the length)
        start = torch.cat([past.new_zeros(self.n_layers, 2, batch, 1, 1, self.d_model),
                           past], dim=4)[:, :, :, 0, -1]  # [L, 2, b, d]
        h, c = list(start[:, 0].unbind(0)), list(start[:, 1].unbind(0))
        tops, entries = [], []
        for step in range(seq):
            inp = x[:, step]
            for layer in range(self.n_layers):
                if layer:
                    inp = F.dropout(inp, self.lstm.dropout, self.training)
                new_h, new_c = self._cell(layer, inp, h[layer], c[layer])
                # a padded position leaves the state as it was
                h[layer] = torch.where(keep[:, step], new_h, h[layer])
                c[layer] = torch.where(keep[:, step], new_c, c[layer])
                inp = h[layer]
            tops.append(inp)
            entries.append(torch.stack([torch.stack(h), torch.stack(c)], dim=1))  # [L, 2, b, d]
        logits = F.linear(self.dropout(torch.stack(tops, dim=1)), self.embedding.weight)
        present = torch.cat([past, torch.stack(entries, dim=3)[:, :, :, None]], dim=4)
        return logits, present


def build_model(model_cfg: dict, vocab_size: int) -> nn.Module:
    """The model `model_cfg["name"]` names, with the rest as its options (an unknown
    option is a TypeError naming it)."""
    classes = {"lm_transformer": DecoderLM, "lm_lstm": LSTMLM}
    name = model_cfg.get("name")
    if name not in classes:
        raise ValueError(f"model.name: unknown language model {name!r} "
                         f"({', '.join(MODELS)})")
    options = {k: v for k, v in dict(model_cfg).items() if k != "name"}
    return classes[name](vocab_size, **options)
