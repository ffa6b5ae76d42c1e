"""Model architectures, chosen by `model.name` in conf/model/.

Every model maps (input_ids, attention_mask), both (batch, seq) int64, to logits
(batch, num_classes): the contract that export and serving rely on.
"""

from __future__ import annotations

from torch import nn


def build_model(cfg: dict, vocab_size: int, num_classes: int, max_length: int, pad_id: int
                ) -> nn.Module:
    options = {k: v for k, v in cfg.items() if k != "name"}
    if cfg["name"] == "transformer":
        from pipeline.tasks.text_classification.models.transformer import (
            TransformerClassifier as model_class,
        )
    elif cfg["name"] == "lstm":
        from pipeline.tasks.text_classification.models.lstm import LSTMClassifier as model_class
    elif cfg["name"] == "pretrained":
        from pipeline.tasks.text_classification.models.pretrained import (
            PretrainedClassifier as model_class,
        )
    else:
        raise ValueError(f"model.name: unknown model {cfg['name']!r} "
                         "(transformer, lstm, pretrained)")
    return model_class(vocab_size, num_classes, max_length, pad_id, **options)
