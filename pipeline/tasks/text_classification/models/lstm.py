"""A bidirectional LSTM classifier: the classic baseline.

The backward direction reads each text from its own last token, not from the end
of the padded batch: every row is reversed within its length before the backward
LSTM and restored after it. Padding therefore never flows into a real token's
state, and, as with the Transformer, a text's logits do not depend on its batch.
(Packed sequences would do the same but do not export to ONNX.)
"""

from __future__ import annotations

import torch
from torch import nn


def reverse_within_length(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each row's first `length` steps, leaving the padding where it is."""
    steps = torch.arange(x.size(1), device=x.device).unsqueeze(0)  # (1, seq)
    last = (lengths - 1).unsqueeze(1)  # (batch, 1)
    index = torch.where(steps <= last, last - steps, steps)  # (batch, seq)
    return x.gather(1, index.unsqueeze(-1).expand_as(x))


class LSTMClassifier(nn.Module):
    # torch.export fixes nn.LSTM to the example's batch and length; the TorchScript
    # exporter keeps both dynamic (pipeline/stages/deploy.py reads this).
    onnx_exporter = "torchscript"

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        max_length: int,
        pad_id: int,
        embedding_dim: int = 128,
        hidden_size: int = 128,
        num_layers: int = 1,
        dropout: float = 0.3,
    ):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_id)
        between = dropout if num_layers > 1 else 0.0
        self.forward_lstm = nn.LSTM(embedding_dim, hidden_size, num_layers,
                                    batch_first=True, dropout=between)
        self.backward_lstm = nn.LSTM(embedding_dim, hidden_size, num_layers,
                                     batch_first=True, dropout=between)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(4 * hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask.bool().unsqueeze(-1)
        lengths = attention_mask.sum(1).clamp(min=1)
        x = self.dropout(self.embedding(input_ids))
        forward_states, _ = self.forward_lstm(x)
        backward_states, _ = self.backward_lstm(reverse_within_length(x, lengths))
        states = torch.cat([forward_states, reverse_within_length(backward_states, lengths)], -1)
        # Max and mean over the real tokens: max picks the strongest cue, mean the tone.
        max_pooled = states.masked_fill(~keep, float("-inf")).amax(1)
        mean_pooled = (states * keep).sum(1) / lengths.unsqueeze(1)
        return self.classifier(self.dropout(torch.cat([max_pooled, mean_pooled], -1)))
