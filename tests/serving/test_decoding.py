"""Next-word decoding through the bundle's cached ONNX graph (serving/bundle/decoding.py),
against the PyTorch models it was exported from (pipeline/tasks/next_word/): tiny
models trained for a moment on a word chain (so that, unlike at random init, their
distributions have clear and varied peaks) over a tiny word-level vocabulary,
exported in a temporary bundle."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from pipeline.tasks.next_word.export import export_onnx, quantize_best, torch_logits
from pipeline.tasks.next_word.models import LSTMLM, DecoderLM
from pipeline.tasks.next_word.parity import (
    cached_logits,
    check_parity,
    greedy_parity,
    staggered_invariance,
)
from pipeline.tasks.parity import DeployError
from serving.bundle.decoding import Decoder, Sequence, generate
from serving.bundle.next_word_inputs import NextWordInputs
from serving.bundle.sampling import Sampling
from serving.bundle.words import DECODER

WORDS = ("the king queen lord lady a an and or but to of in on at by with for from is was "
         "be not no my thy his her our your good night day sweet love death fair").split()
SPECIAL = {"pad_id": 0, "unk_id": 1, "eos_id": 2}
MAX_LEN = 24
FP32 = 1e-4


@dataclass
class Built:
    path: Path
    model: torch.nn.Module
    meta: dict
    decoder: Decoder
    int8: Decoder
    int8_report: dict


def tokenizer() -> Tokenizer:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = DECODER
    return tok


def word_chain(vocab: int, rows: int, length: int) -> list[list[int]]:
    """Rows of a Markov chain in which each word has three likely successors."""
    rng = np.random.default_rng(0)
    successors = rng.integers(3, vocab, (vocab, 3))
    out = []
    for _ in range(rows):
        row = [int(rng.integers(3, vocab))]
        while len(row) < length:
            row.append(int(successors[row[-1]][rng.choice(3, p=[0.6, 0.3, 0.1])]))
        out.append(row)
    return out


def train_briefly(model: torch.nn.Module, rows: list[list[int]], vocab: int) -> None:
    data = torch.tensor(rows)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(60):
        batch = data[torch.randint(0, len(data), (32,))]
        logits, _ = model(batch[:, :-1], use_cache=False)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab),
                                                 batch[:, 1:].reshape(-1))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def build(path: Path, name: str) -> Built:
    torch.manual_seed(0)
    vocab = len(WORDS) + 3
    rows = word_chain(vocab, 256, 16)
    if name == "lm_transformer":
        model = DecoderLM(vocab, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_len=MAX_LEN,
                          dropout=0.0)
        meta = {"max_len": MAX_LEN}
    else:
        model = LSTMLM(vocab, d_model=32, n_layers=2, dropout=0.0)
        meta = {"max_len": None, "cache": "last"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses time to threads
    try:
        train_briefly(model, rows, vocab)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    meta |= {"task": "next_word", "special": SPECIAL}
    path.mkdir()
    tokenizer().save(str(path / "tokenizer.json"))
    (path / "bundle.json").write_text(json.dumps(meta))
    export_onnx(model, path / "model.onnx", opset=18)
    report = quantize_best(path / "model.onnx", path / "model.int8.onnx", model,
                           rows[:16], rows[16:48], SPECIAL["pad_id"])
    inputs = NextWordInputs(path, meta)
    decoders = [Decoder(ort.InferenceSession(str(path / f), providers=["CPUExecutionProvider"]),
                        meta, inputs) for f in ("model.onnx", "model.int8.onnx")]
    return Built(path, model, meta, *decoders, report)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Each model's bundle, built once when a test first asks for it."""
    root, made = tmp_path_factory.mktemp("bundles"), {}

    def get(name: str) -> Built:
        if name not in made:
            made[name] = build(root / name, name)
        return made[name]
    return get


@pytest.fixture(params=["lm_transformer", "lm_lstm"])
def built(request, bundles):
    return bundles(request.param)


@pytest.fixture
def transformer(bundles):
    return bundles("lm_transformer")


def ids(decoder: Decoder, text: str) -> list[int]:
    return decoder.inputs.encode([text])[0]


PROMPTS = ["the king", "good night sweet lady and", "to be or not to be",
           "my lord", "fair", "her love was death to the queen"]


def test_one_graph_takes_a_prompt_with_an_empty_past_then_one_token_at_a_time(built):
    session = built.decoder.session
    inputs = {i.name: i.shape for i in session.get_inputs()}
    assert list(inputs) == ["input_ids", "attention_mask", "past_key_values"]
    assert inputs["past_key_values"][4] == "past_tokens"
    assert [o.name for o in session.get_outputs()] == ["logits", "present_key_values"]
    prompt = [2, *ids(built.decoder, "to be or not to be")]
    expected = torch_logits(built.model, [prompt], 0)[0]
    seq = Sequence(ids=prompt[:3])  # past_tokens 0 on the first call: a zero-length axis
    first = built.decoder.step([seq])
    assert seq.kv.shape[3] == (1 if built.meta.get("cache") == "last" else 3)
    seq.pending = [prompt[3]]
    second = built.decoder.step([seq])
    assert np.abs(first[0] - expected[2]).max() < FP32
    assert np.abs(second[0] - expected[3]).max() < FP32


def test_cached_decoding_gives_the_logits_of_one_uncached_pass(built):
    for text in PROMPTS[1:3]:
        prompt = ids(built.decoder, text)
        uncached = torch_logits(built.model, [[2, *prompt]], 0)[0]
        for split in (1, len(prompt) // 2):
            cached = cached_logits(built.decoder, prompt, split)
            assert np.abs(cached - uncached[split:]).max() < FP32


def test_a_sequences_logits_do_not_depend_on_the_sequences_beside_it(built):
    """Six prompts of different lengths, two joining at each step: prompts of
    different lengths and pasts of every length are left-padded together."""
    prompts = [ids(built.decoder, t) for t in PROMPTS]
    assert staggered_invariance(built.decoder, prompts, steps=4) < FP32


def test_chunks_fed_after_pasts_of_other_lengths_match_one_pass(built):
    """Two sequences with pasts of 3 and 5 tokens each take several tokens at once:
    the mask has padding before each past and before each chunk."""
    decoder = built.decoder
    texts = ["good night sweet lady and", "to be or not to be"]
    prompts = [[2, *ids(decoder, t)] for t in texts]
    seqs = [Sequence(ids=prompts[0][:3]), Sequence(ids=prompts[1][:5])]
    decoder.step(seqs)
    seqs[0].pending, seqs[1].pending = prompts[0][3:6], prompts[1][5:7]
    logits = decoder.step(seqs)
    expected = torch_logits(built.model, prompts, 0)
    assert np.abs(logits[0] - expected[0][5]).max() < FP32
    assert np.abs(logits[1] - expected[1][6]).max() < FP32


def test_greedy_decoding_is_pytorchs_argmax_continuation(built):
    prompts = [ids(built.decoder, t) for t in PROMPTS[:4]]
    report = greedy_parity(built.model, built.decoder, prompts, new_tokens=8, tie=0)
    assert report["identical"] == 4, report


def test_a_seeded_sample_repeats_alone_and_batched_and_another_seed_differs(transformer):
    decoder = transformer.decoder
    settings = Sampling(temperature=1.5, top_k=20, top_p=0.95, seed=7, max_new_tokens=10)
    first = generate(decoder, "the king", settings).generated
    assert generate(decoder, "the king", settings).generated == first
    other = Sampling(temperature=1.5, top_k=20, top_p=0.95, seed=8, max_new_tokens=10)
    assert generate(decoder, "the king", other).generated != first
    # the same request joining a running batch at its third step
    running = [decoder.start(ids(decoder, t), Sampling(temperature=1.0, seed=i))
               for i, t in enumerate(PROMPTS[2:4])]
    for _ in range(2):
        decoder.advance(running)
    mine = decoder.start(ids(decoder, "the king"), settings)
    while not mine.finished:
        decoder.advance([s for s in [*running, mine] if not s.finished])
    assert mine.generated == first


def test_top_k_and_top_p_limit_what_a_sample_can_be(transformer):
    decoder = transformer.decoder
    logits = decoder.step([decoder.start(ids(decoder, "my lord"))])[0]
    logits[decoder.banned] = -np.inf
    top3 = set(np.argsort(logits)[-3:].tolist())
    samples = {generate(decoder, "my lord", Sampling(temperature=2.0, top_k=3, seed=s,
                                                     max_new_tokens=1)).ids[-1]
               for s in range(30)}
    assert samples <= top3 and len(samples) > 1
    tiny_p = {generate(decoder, "my lord", Sampling(temperature=2.0, top_p=1e-6, seed=s,
                                                    max_new_tokens=1)).ids[-1]
              for s in range(5)}
    assert tiny_p == {int(np.argmax(logits))}


def test_max_new_tokens_and_stop_sequences_end_a_continuation(transformer):
    decoder = transformer.decoder
    full = generate(decoder, "good night", Sampling(max_new_tokens=8))
    assert len(full.generated) == 8 and full.finish_reason == "length"
    assert full.text == decoder.inputs.decode(full.generated)
    stop = full.text.split(" ")[3]
    stopped = generate(decoder, "good night", Sampling(max_new_tokens=8, stop=(stop,)))
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.find(stop)]
    assert stop not in stopped.text and len(stopped.generated) < 8


def test_streamed_text_holds_back_what_may_become_a_stop_sequence():
    seq = Sequence(ids=[2], settings=Sampling(stop=("not so",)))
    seq.text = "to be or not"
    assert seq.visible_text() == "to be or "
    seq.text = "to be or nought"
    assert seq.visible_text() == "to be or nought"


def test_the_context_bounds_a_prompt_and_its_continuation(transformer):
    decoder = transformer.decoder
    longest = ["good"] * (MAX_LEN - 1)  # with the [EOS] before it, the whole context
    seq = generate(decoder, " ".join(longest), Sampling(max_new_tokens=10))
    # the first token comes from the last position; the next would have none
    assert len(seq.generated) == 1 and seq.finish_reason == "length"
    with pytest.raises(ValueError, match=f"prompt has {MAX_LEN} tokens, the model's "
                                         f"context holds {MAX_LEN - 1}"):
        decoder.start(ids(decoder, " ".join(longest + ["night"])))


def test_top_k_next_words_are_the_models_most_probable_words(transformer):
    decoder = transformer.decoder
    batched = decoder.next_word_topk(PROMPTS[:3], k=5)
    for text, suggestions in zip(PROMPTS[:3], batched, strict=True):
        logits = torch_logits(transformer.model, [[2, *ids(decoder, text)]], 0)[0][-1]
        probs = torch.softmax(torch.from_numpy(logits).double(), -1).numpy()
        probs[[0, 1, 2]] = 0  # padding, [UNK] and [EOS] are not words to suggest
        expected = [(WORDS[i - 3], probs[i]) for i in np.argsort(-probs)[:5]]
        assert [w for w, _ in suggestions] == [w for w, _ in expected]
        assert np.allclose([p for _, p in suggestions], [p for _, p in expected], atol=1e-5)
        alone = decoder.next_word_topk([text], k=5)[0]  # not padded beside the others
        assert [w for w, _ in alone] == [w for w, _ in suggestions]
        assert np.allclose([p for _, p in alone], [p for _, p in suggestions], atol=1e-6)


def test_a_prompts_surprisal_is_its_mean_token_log_loss_under_pytorch(built):
    """Measured in the same cached call as the top-k, alone or beside prompts of other
    lengths: each prompt word scored by the position before it ([EOS] for the first)."""
    decoder = built.decoder
    prompts = [ids(decoder, t) for t in PROMPTS[:4]]
    rows, surprisal = decoder.topk_surprisal(prompts, 3)
    assert rows == decoder.topk(prompts, 3)
    for prompt, measured in zip(prompts, surprisal, strict=True):
        logits = torch.from_numpy(torch_logits(built.model, [[2, *prompt]], 0)[0]).double()
        logprobs = torch.log_softmax(logits, -1)[:-1]  # the last predicts what follows
        expected = -logprobs[torch.arange(len(prompt)), torch.tensor(prompt)].mean().item()
        assert measured == pytest.approx(expected, abs=1e-4)
        assert decoder.topk_surprisal([prompt], 3)[1][0] == pytest.approx(measured, abs=1e-5)
    # nothing to measure in an empty prompt; text like the training chain's is far
    # less surprising than the same words in reverse
    assert decoder.topk_surprisal([[]], 3)[1] == [None]
    chain = word_chain(len(WORDS) + 3, 1, 12)[0]
    (forwards, backwards) = decoder.topk_surprisal([chain, chain[::-1]], 3)[1]
    assert backwards > 2 * forwards


def test_int8_keeps_pytorchs_next_word_and_static_int8_ignores_the_batch(built):
    report = built.int8_report
    scores = report["validation_top1_agreement"]
    assert set(scores) == {"static", "dynamic"}
    assert scores[report["scheme"]] > 0.9
    if report["scheme"] == "static":  # fixed scales: companions cannot move a sequence
        prompts = [ids(built.int8, t) for t in PROMPTS]
        assert staggered_invariance(built.int8, prompts, steps=4) < FP32


def test_deploy_checks_report_and_refuse_int8_below_its_floor(transformer):
    prompts = [ids(transformer.decoder, t) for t in PROMPTS]
    tolerances = {"fp32_max_abs_diff": FP32, "int8_min_agreement": 0.5,
                  "int8_batch_max_abs_diff": 1.0}
    parity = check_parity(transformer.path, transformer.model, prompts, tolerances,
                          new_tokens=6, sample=4)
    assert parity["greedy"]["identical"] == 4
    assert parity["cached_max_abs_diff"] < FP32
    with pytest.raises(DeployError, match="int8 top-1 next tokens agree with PyTorch at"):
        check_parity(transformer.path, transformer.model, prompts,
                     tolerances | {"int8_min_agreement": 1.01}, new_tokens=6, sample=4)
