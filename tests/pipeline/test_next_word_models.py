"""next_word's model half on tiny data: the causal mask hides the future, the cache
gives the full pass's logits (left-padded prompts of different lengths included), the
output layer is the embedding, a few steps learn a repetitive corpus, the metrics and
the Kneser-Ney baseline give known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from datasets import Dataset, DatasetDict, Features, List, Value

from pipeline.tasks.next_word.datamodule import NextWordDataModule, collate
from pipeline.tasks.next_word.evaluation import lm_metrics
from pipeline.tasks.next_word.inference import load_module, logits_fn, predict_logits
from pipeline.tasks.next_word.lm import NextWordModule
from pipeline.tasks.next_word.models import build_model
from pipeline.tasks.next_word.ngram import KneserNey, kn_metrics, stream_of

VOCAB = 23
CONFIGS = {
    "lm_transformer": {"name": "lm_transformer", "d_model": 16, "n_heads": 2, "n_layers": 2,
                       "d_ff": 32, "max_len": 32, "dropout": 0.0},
    "lm_lstm": {"name": "lm_lstm", "d_model": 32, "n_layers": 2, "dropout": 0.0},
}


@pytest.fixture(params=sorted(CONFIGS))
def model(request) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(CONFIGS[request.param], VOCAB).eval()


def ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


@torch.no_grad()
def test_changing_a_later_token_leaves_earlier_positions_unchanged(model):
    tokens = ids([3, 4, 5, 6, 7, 8, 9])
    changed = tokens.clone()
    changed[0, 4] = 15
    # with no mask (training's path) and with one (the padded and cached path)
    for mask in (None, torch.ones_like(tokens)):
        before, _ = model(tokens, mask)
        after, _ = model(changed, mask)
        torch.testing.assert_close(after[:, :4], before[:, :4], rtol=0, atol=0)
        # and the change is seen from its own position on
        assert (after[:, 4:] - before[:, 4:]).abs().amax(-1).min() > 1e-4


@torch.no_grad()
def test_decoding_with_the_cache_equals_the_full_pass(model):
    tokens = ids([3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18])
    full, full_present = model(tokens)
    logits, past = model(tokens[:, :3])
    steps = [logits]
    for position in range(3, tokens.shape[1]):
        mask = torch.ones(2, position + 1, dtype=torch.int64)
        logits, past = model(tokens[:, position:position + 1], mask, past)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    torch.testing.assert_close(past, full_present, rtol=0, atol=1e-5)


@torch.no_grad()
def test_left_padded_prompts_of_different_lengths_decode_as_each_alone(model):
    long, short, pad = [3, 4, 5, 6, 7], [8, 9], 0
    batch = ids(long, [pad] * 3 + short)
    mask = ids([1] * 5, [0] * 3 + [1] * 2)
    logits, past = model(batch, mask)
    rows = [[logits[0, -1]], [logits[1, -1]]]
    continuation = [[10, 11], [12, 13], [14, 15]]
    for new in continuation:
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)], 1)
        logits, past = model(ids(*[[t] for t in new]), mask, past)
        rows[0].append(logits[0, -1])
        rows[1].append(logits[1, -1])
    for row, prompt in enumerate((long, short)):
        alone, _ = model(ids(prompt + [pair[row] for pair in continuation]))
        expected = alone[0, len(prompt) - 1:]
        torch.testing.assert_close(torch.stack(rows[row]), expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_the_output_layer_is_the_token_embedding(model):
    # tied: a token whose embedding row is zero scores exactly 0 everywhere
    model.embedding.weight[7] = 0.0
    logits, _ = model(ids([3, 4, 5, 6]))
    assert torch.all(logits[..., 7] == 0.0) and torch.all(logits[..., 8] != 0.0)
    big = [name for name, p in model.named_parameters() if p.shape[0] == VOCAB]
    assert big == ["embedding.weight"]


@torch.no_grad()
def test_lstm_whole_block_path_equals_its_step_by_step_path():
    torch.manual_seed(0)
    lstm = build_model(CONFIGS["lm_lstm"], VOCAB).eval()
    tokens = ids([3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14])
    fast, none = lstm(tokens, use_cache=False)  # nn.LSTM over the block
    stepped, _ = lstm(tokens, torch.ones_like(tokens))
    assert none is None
    torch.testing.assert_close(fast, stepped, rtol=0, atol=1e-5)


def cycle_blocks(count: int, block: int = 8) -> list[list[int]]:
    """A stream that repeats 3 4 5 6 7, packed as preprocess packs (one token overlap)."""
    stream = [3 + i % 5 for i in range(count * block + 1)]
    return [stream[i * block: i * block + block + 1] for i in range(count)]


@pytest.fixture()
def processed(tmp_path):
    features = Features({"ids": List(Value("int64"))})
    splits = {"train": cycle_blocks(32), "val": cycle_blocks(3) + [[3, 4, 5]],
              "test": cycle_blocks(2)}
    DatasetDict({name: Dataset.from_dict({"ids": rows}, features=features)
                 for name, rows in splits.items()}).save_to_disk(tmp_path / "dataset")
    return tmp_path


def test_batches_shift_targets_and_pad_labels_with_minus_100():
    batch = collate([[3, 4, 5, 6], [7, 8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[3, 4, 5], [7, 0, 0]]
    assert batch["labels"].tolist() == [[4, 5, 6], [8, -100, -100]]


def test_training_order_is_seeded_and_changes_per_epoch(processed):
    def order(seed: int, epoch: int) -> list:
        dm = NextWordDataModule(processed, pad_id=0, batch_size=4, seed=seed)
        dm.setup()
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [b["input_ids"].tolist() for b in loader]
    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)


@pytest.mark.parametrize(("name", "lr"), [("lm_transformer", 1e-2), ("lm_lstm", 5e-2)])
def test_a_few_epochs_learn_a_repetitive_corpus(processed, tmp_path, name, lr):
    pl.seed_everything(0)
    module = NextWordModule(CONFIGS[name], VOCAB, pad_id=0, lr=lr, warmup_ratio=0.0)
    dm = NextWordDataModule(processed, pad_id=0, batch_size=4, seed=0)
    trainer = pl.Trainer(max_epochs=30, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    dm.setup()
    before = lm_metrics(logits_fn(module), dm.rows["val"], 4)
    trainer.fit(module, datamodule=dm)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert {"train_loss", "val_loss", "val_ppl", "val_acc", "val_top5"} <= set(logged)
    assert logged["val_loss"] < 0.5 * before["cross_entropy"]
    assert logged["val_ppl"] == pytest.approx(math.exp(logged["val_loss"]), rel=1e-4)
    assert logged["val_acc"] > 0.9  # the cycle is deterministic after one token

    # the checkpoint comes back in eval mode with the same logits, per block
    trainer.save_checkpoint(tmp_path / "lm.ckpt")
    loaded = load_module(tmp_path / "lm.ckpt")
    assert not loaded.training
    blocks = dm.rows["val"]
    logits = predict_logits(loaded, blocks, batch_size=3)
    assert [len(x) for x in logits] == [len(b) - 1 for b in blocks]
    after = lm_metrics(logits_fn(loaded), blocks, 3)
    assert after["cross_entropy"] == pytest.approx(logged["val_loss"], rel=1e-4)


def test_lm_metrics_known_answer():
    # every real position gets the same distribution over 8 tokens, most likely first
    probs = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])
    seen = []

    def fixed(input_ids, attention_mask):
        seen.append(attention_mask.tolist())
        logits = np.tile(np.log(probs), (*input_ids.shape, 1))
        logits[attention_mask == 0] = 1e9  # padded positions must be ignored
        return logits

    # targets 0 (rank 0), 3 (rank 3: ties with 4 count for it) and 6 (rank 6)
    result = lm_metrics(fixed, [[5, 0, 3], [2, 6]], batch_size=2, words=2)
    assert seen == [[[1, 1], [1, 0]]]
    nll = -(math.log(0.3) + math.log(0.1) + math.log(0.05))
    assert result["tokens"] == 3
    assert result["cross_entropy"] == pytest.approx(nll / 3)
    assert result["perplexity"] == pytest.approx(math.exp(nll / 3))
    assert result["perplexity_per_word"] == pytest.approx(math.exp(nll / 2))
    assert result["top1_accuracy"] == pytest.approx(1 / 3)
    assert result["top5_accuracy"] == pytest.approx(2 / 3)


# Kneser-Ney on the stream 1 2 1 2 1 3 over 4 tokens, discount 1/2, worked by hand:
# unigram continuation counts N1+(. w) are 1 for tokens 1, 2, 3 (0 for 0) out of 3,
# so P1(w) = 0.5/3 + (0.5 * 3/3) / 4 = 7/24 for 1, 2, 3 and 1/8 for 0.
STREAM = [1, 2, 1, 2, 1, 3]
P1 = np.array([1 / 8, 7 / 24, 7 / 24, 7 / 24])


def test_kneser_ney_bigram_known_answer_and_backoff():
    kn = KneserNey(order=2, discount=0.5).fit(np.array(STREAM), 4)
    after_1, after_3 = kn.distributions(np.array([[1], [3]]))
    # c(1 2) = 2, c(1 3) = 1 of c(1 .) = 3 with 2 types: weight 0.5 * 2 / 3 = 1/3 on P1
    np.testing.assert_allclose(after_1, [1 / 24, 7 / 72, 1 / 2 + 7 / 72, 1 / 6 + 7 / 72])
    # 3 is never followed by anything: all mass backs off to the unigram level
    np.testing.assert_allclose(after_3, P1)


def test_kneser_ney_trigram_uses_continuation_counts_below_the_top():
    kn = KneserNey(order=3, discount=0.5).fit(np.array(STREAM), 4)
    # distinct trigrams 1 2 1, 2 1 2, 2 1 3: N1+(. 1 2) = N1+(. 1 3) = 1, so
    # P2(2 | 1) = 0.5/2 + (0.5 * 2/2) * 7/24 = 19/48; on top, c(2 1 2) = c(2 1 3) = 1:
    # P(2 | 2 1) = 0.5/2 + (0.5 * 2/2) * 19/48 = 43/96
    (dist,) = kn.distributions(np.array([[2, 1]]))
    assert dist[2] == pytest.approx(43 / 96)
    # "3 1" never occurs: all its mass goes to the continuation bigram level, P2(. | 1)
    (unseen,) = kn.distributions(np.array([[3, 1]]))
    np.testing.assert_allclose(unseen, [1 / 16, 7 / 48, 19 / 48, 19 / 48])


def test_kneser_ney_distributions_sum_to_one():
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 30, 2000)
    kn = KneserNey(order=4, discount=0.75).fit(stream, 40)  # tokens 30-39 never seen
    contexts = np.concatenate([stream[100:103][None], [[39, 38, 37]], [[1, 2, 39]]])
    dist = kn.distributions(contexts)
    np.testing.assert_allclose(dist.sum(1), 1.0)
    assert (dist > 0).all()
    np.testing.assert_allclose(kn.distributions(np.array([[5]])).sum(), 1.0)


def test_kneser_ney_scores_blocks_with_their_own_context():
    blocks = [[1, 2, 1, 2, 1, 3], [3, 1, 2]]
    assert stream_of(blocks).tolist() == STREAM + [1, 2]
    # block [2, 1, 2]: target 1 after "2" (the top order a one-token context allows,
    # raw bigram counts: c(2 1) = 2 of 2, 1 type: 0.75 + 0.25 * 7/24 = 79/96), then 2
    # after "2 1" (43/96)
    result = kn_metrics([STREAM], [[2, 1, 2]], 4, order=3, discount=0.5)
    nll = -(math.log(79 / 96) + math.log(43 / 96))
    assert result["tokens"] == 2
    assert result["cross_entropy"] == pytest.approx(nll / 2)
    assert result["top1_accuracy"] == 1.0
