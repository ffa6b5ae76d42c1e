"""Next-word prediction and generation with a bundle's cached ONNX language model.

The model (pipeline/tasks/next_word/export.py) takes `input_ids` [batch, tokens],
`attention_mask` [batch, past_tokens + tokens] and `past_key_values` [layers, 2,
batch, heads, past_tokens, head_dim], and gives `logits` [batch, tokens, vocab] and
`present_key_values` (the past with the new tokens' entries appended). One graph serves
a prompt (past_tokens 0) and every generated token (tokens 1), so each new token costs
one step over one position, not a pass over the whole prefix.

`Decoder.step` takes any set of `Sequence`s, whatever their state: a sequence that has
just joined feeds its whole prompt, the others their last token; the generating ones
share one model call and the joining ones another. That is what a continuous-batching
scheduler calls at every decoding step (`Decoder.advance` adds choosing the tokens and
stopping). Each sequence keeps only its own cache entries (the padding other rows
needed is cut off after the call), so its outputs do not depend on what it was
batched with beyond float noise.

numpy, onnxruntime and tokenizers only: no torch, nothing from `pipeline/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from serving.bundle.next_word_inputs import NextWordInputs
from serving.bundle.sampling import Sampling, choose, log_softmax
from serving.bundle.surprisal import logsumexp, measure

INPUTS = ("input_ids", "attention_mask", "past_key_values")
OUTPUTS = ("logits", "present_key_values")
@dataclass
class Sequence:
    """One request's decoding state.

    `ids` is every token so far (the prompt, then the generated ones), `pending` those
    not yet fed to the model; the model has seen `ids[:fed]`, and `kv` holds their
    cache entries [layers, 2, heads, entries, head_dim], this sequence's own and no
    padding (a recurrent model keeps only its last state: one entry). The entries live
    in a buffer that grows by doubling, so a step appends in place instead of copying
    the whole cache.
    """

    ids: list[int]
    settings: Sampling = field(default_factory=Sampling)
    pending: list[int] = field(init=False)
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "eos" | "stop" | "length"
    text: str = ""  # the continuation, cut before a stop sequence
    fed: int = 0
    entries: int = 0
    buffer: np.ndarray | None = field(default=None, repr=False)
    rng: np.random.Generator = field(init=False, repr=False)
    # Measured when not None: the model's surprisal (nats) of each token fed after the
    # first, and the last fed token's logits (with their logsumexp) for the one after.
    surprisal: list[float] | None = field(default=None, repr=False)
    last_logprobs: tuple[np.ndarray, float] | None = field(default=None, repr=False)
    # the word the model put first after the prompt (what /predict would suggest
    # first), whatever the sampling then chose: what the prediction log labels
    first_top: int | None = None

    def __post_init__(self):
        self.pending = list(self.ids)
        self.rng = np.random.default_rng(self.settings.seed)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def kv(self) -> np.ndarray | None:
        return None if self.buffer is None else self.buffer[:, :, :, :self.entries]

    def keep(self, new: np.ndarray, last_only: bool) -> None:
        """Add this call's entries [layers, 2, heads, n, head_dim] to the cache (or,
        for a recurrent model, keep just the last)."""
        if last_only:
            self.buffer, self.entries = np.ascontiguousarray(new[:, :, :, -1:]), 1
            return
        needed = self.entries + new.shape[3]
        if self.buffer is None or needed > self.buffer.shape[3]:
            shape = list(new.shape)
            shape[3] = max(needed, 2 * self.entries, 16)
            grown = np.empty(shape, np.float32)
            grown[:, :, :, :self.entries] = self.kv
            self.buffer = grown
        self.buffer[:, :, :, self.entries:needed] = new
        self.entries = needed

    def visible_text(self) -> str:
        """What may be streamed so far: the continuation without a tail that could
        still turn out to be the start of a stop sequence."""
        if self.finished:
            return self.text
        held = max((n for stop in self.settings.stop for n in range(len(stop), 0, -1)
                    if self.text.endswith(stop[:n])), default=0)
        return self.text[: len(self.text) - held]


class Decoder:
    """Batched, cached decoding over one onnxruntime session of a next-word bundle.

    `meta` is bundle.json: `special` (`pad_id`, `unk_id`, `eos_id`); `max_len`, the model's
    context in tokens (positions it has embeddings for; null for a model without
    one, the LSTM); `cache`, "all" (a Transformer's keys and values) or "last" (a
    recurrent model, whose last state is all it needs).
    """

    def __init__(self, session: ort.InferenceSession, meta: dict,
                 inputs: NextWordInputs | None = None):
        self.session, self.inputs = session, inputs
        names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        if names != (list(INPUTS), list(OUTPUTS)):
            raise ValueError(f"model takes {names[0]} and gives {names[1]}, a next-word "
                             f"model takes {list(INPUTS)} and gives {list(OUTPUTS)}")
        self.layers, _, _, self.heads, _, self.head_dim = session.get_inputs()[2].shape
        self.vocab_size = session.get_outputs()[0].shape[-1]
        # a graph exported for one token per call: an LSTM's Python step loop unrolled
        self.one_token = session.get_inputs()[0].shape[1] == 1
        special = meta["special"]
        self.pad_id, self.unk_id, self.eos_id = (special["pad_id"], special["unk_id"],
                                                 special["eos_id"])
        self.max_len = meta.get("max_len")
        self.keep_last = meta.get("cache", "all") == "last"
        # never produced: padding, and [UNK], which says only "a rare word" (it stays
        # in the distribution, so probabilities are the model's own)
        self.banned = [self.pad_id, self.unk_id]

    # ------------------------------------------------------------ requests

    def start(self, prompt: list[int], settings: Sampling | None = None) -> Sequence:
        """A new sequence for a prompt's word ids. The prompt follows [EOS], as every
        document did in training (the end of the one before), so an empty prompt asks
        for a document's first word. ValueError when it does not fit the context."""
        ids = [self.eos_id, *prompt]
        if self.max_len is not None and len(ids) > self.max_len:
            raise ValueError(f"prompt has {len(prompt)} tokens, the model's context holds "
                             f"{self.max_len - 1}")
        return Sequence(ids=ids, settings=settings or Sampling())

    def step(self, seqs: list[Sequence]) -> np.ndarray:
        """Feed every sequence's pending tokens; return each one's next-token logits
        [len(seqs), vocab] and extend its cache.

        Sequences that are generating (one pending token) share one model call, and
        sequences that have just joined (a prompt pending) another: in one call every
        row would be padded to the longest prompt, and 7 generating rows beside one
        64-token prompt cost 4x the two calls (d_model 256, 4 layers). A graph that
        takes one token per call (the LSTM's) is called once per token of the longest
        chunk, each sequence joining for its own last tokens.
        """
        if any(not s.pending for s in seqs):
            raise ValueError("step: a sequence has no pending tokens (finished?)")
        if self.one_token:
            longest = max(len(s.pending) for s in seqs)
            for left in range(longest, 1, -1):
                ready = [s for s in seqs if len(s.pending) >= left]
                self._call(ready, [[s.pending[-left]] for s in ready])
            logits = self._call(seqs, [s.pending[-1:] for s in seqs])
        else:
            logits = np.empty((len(seqs), self.vocab_size), np.float32)
            for phase in (True, False):
                rows = [i for i, s in enumerate(seqs) if (len(s.pending) > 1) == phase]
                if rows:
                    logits[rows] = self._call([seqs[i] for i in rows],
                                              [seqs[i].pending for i in rows])
        for s in seqs:
            s.pending = []
        return logits

    def _call(self, seqs: list[Sequence], chunks: list[list[int]]) -> np.ndarray:
        """One model call. Chunks and pasts are left-padded to common lengths and the
        attention mask marks the padding, so a row's mask is [0.. past ..1 | 0.. new
        ..1]: a position counts only the real tokens before it."""
        new = max(len(c) for c in chunks)
        past = max(s.entries for s in seqs)
        batch = len(seqs)
        input_ids = np.full((batch, new), self.pad_id, dtype=np.int64)
        mask = np.zeros((batch, past + new), dtype=np.int64)
        kv = np.zeros((self.layers, 2, batch, self.heads, past, self.head_dim), np.float32)
        for row, (s, chunk) in enumerate(zip(seqs, chunks, strict=True)):
            n, c = s.entries, len(chunk)
            input_ids[row, new - c:] = chunk
            mask[row, past - n: past] = 1
            mask[row, past + new - c:] = 1
            if n:
                kv[:, :, row, :, past - n:] = s.kv
        logits, present = self.session.run(
            list(OUTPUTS), {"input_ids": input_ids, "attention_mask": mask,
                            "past_key_values": kv})
        measured = [row for row, s in enumerate(seqs) if s.surprisal is not None]
        lse = None  # [rows, new], at once (no copy when every row is measured)
        if measured:
            lse = logsumexp(logits if len(measured) == len(seqs) else logits[measured])
        for row, (s, chunk) in enumerate(zip(seqs, chunks, strict=True)):
            # its own new entries only: the padding other rows needed is not kept
            s.keep(present[:, :, row, :, past + new - len(chunk):], self.keep_last)
            s.fed += len(chunk)
            if s.surprisal is not None:
                start = new - len(chunk)
                measure(s, chunk, logits[row, start:], lse[measured.index(row), start:])
        return logits[:, -1]

    def advance(self, seqs: list[Sequence]) -> list[int | None]:
        """One decoding step for running sequences: a model call, then each chooses
        its next token and stops when it should. Returns each one's new token
        (None where it ended on [EOS])."""
        logits = self.step(seqs)
        logits[:, self.banned] = -np.inf
        early = [row for row, s in enumerate(seqs)
                 if len(s.generated) < s.settings.min_new_tokens]
        logits[early, self.eos_id] = -np.inf  # not done before min_new_tokens
        tokens = []
        for s, row in zip(seqs, logits, strict=True):
            if s.first_top is None:  # the first step: its best word, [EOS] aside
                s.first_top = int(np.argmax(np.where(np.arange(len(row)) == self.eos_id,
                                                     -np.inf, row)))
            token = choose(row, s.settings, s.rng)
            tokens.append(self._take(s, token))
        return tokens

    def _take(self, s: Sequence, token: int) -> int | None:
        if token == self.eos_id:
            s.finish_reason = "eos"
            return None
        s.generated.append(token)
        s.ids.append(token)
        if self.inputs is not None:  # without a tokenizer there is no text to stop on
            s.text = self.inputs.decode(s.generated)
        cut = [s.text.find(stop) for stop in s.settings.stop if stop in s.text]
        if cut:
            s.text = s.text[: min(cut)]
            s.finish_reason = "stop"
        elif len(s.generated) >= s.settings.max_new_tokens:
            s.finish_reason = "length"
        elif self.max_len is not None and s.fed >= self.max_len:
            # The next token would need a position the model has no embedding for:
            # stop rather than drop the start of the context.
            s.finish_reason = "length"
        else:
            s.pending = [token]
        return token

    # ------------------------------------------------------------ one prefill

    def topk(self, prompts: list[list[int]], k: int) -> list[list[tuple[int, float]]]:
        """The k most probable next words of each prompt's word ids, with their
        probabilities (under the model's full distribution), in one model call."""
        return self.best(self.step([self.start(p) for p in prompts]), k)

    def best(self, logits: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """The k most probable words of each row of next-token logits [n, V]."""
        logprobs = log_softmax(logits.astype(np.float64))
        logprobs[:, [*self.banned, self.eos_id]] = -np.inf  # not words to suggest
        best = np.argsort(-logprobs, axis=1, kind="stable")[:, :k]
        return [[(int(i), float(np.exp(row[i]))) for i in ids]
                for row, ids in zip(logprobs, best, strict=True)]

    def topk_surprisal(self, prompts: list[list[int]], k: int
                       ) -> tuple[list[list[tuple[int, float]]], list[float | None]]:
        """`topk`'s answer and each prompt's mean surprisal per token (nats; None for
        an empty prompt) under the model, from the same call: how unexpected the
        prompt's own words were, one figure of the drift monitor."""
        seqs = [self.start(p) for p in prompts]
        for s in seqs:
            s.surprisal = []
        rows = self.best(self.step(seqs), k)
        return rows, [float(np.mean(s.surprisal)) if s.surprisal else None for s in seqs]

    def next_word_topk(self, texts: list[str], k: int) -> list[list[tuple[str, float]]]:
        """The k most probable next words of each text, with probabilities."""
        if self.inputs is None:
            raise ValueError("next_word_topk: this decoder has no tokenizer (inputs)")
        return [[(self.inputs.words([i])[0], p) for i, p in row]
                for row in self.topk(self.inputs.encode(texts), k)]


def generate(decoder: Decoder, prompt: list[int] | str, settings: Sampling | None = None
             ) -> Sequence:
    """One request decoded on its own, step by step: the reference a batched
    scheduler must match, and what batch tools use."""
    if isinstance(prompt, str):
        if decoder.inputs is None:
            raise ValueError("generate: a text prompt needs the decoder's tokenizer")
        (prompt,) = decoder.inputs.encode([prompt])
    seq = decoder.start(prompt, settings)
    while not seq.finished:
        decoder.advance([seq])
    return seq
