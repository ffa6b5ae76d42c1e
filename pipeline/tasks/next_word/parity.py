"""Deploy's checks of a next-word bundle against the PyTorch model it was exported from.

- fp32 ONNX next-token logits match PyTorch at every position of the prompts;
- the cache is right: a prompt fed in part and then token by token through the
  bundle's decoder (serving/bundle/decoding.py) gives the logits of one uncached
  PyTorch pass over the same tokens;
- greedy continuations are PyTorch's own (an uncached argmax loop);
- int8 picks PyTorch's most probable next token at enough positions;
- batch invariance: a sequence's logits alone equal its logits when it is decoded
  beside others that join at other steps, left-padded in pasts and new tokens alike.

`check_parity` runs them all and raises DeployError naming every check that failed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from pipeline.tasks.next_word.export import onnx_logits, top1, torch_logits
from pipeline.tasks.parity import DeployError
from serving.bundle.bundle import MODEL_FILES
from serving.bundle.decoding import Decoder, generate
from serving.bundle.next_word_inputs import NextWordInputs
from serving.bundle.sampling import Sampling

# Tokens of a prompt checked at most, for a model without a context limit (the LSTM):
# enough positions, without an hour of one-token calls on a long document.
UNBOUNDED_CHECK = 256


def fit(prompts: list[list[int]], decoder: Decoder, room: int = 0) -> list[list[int]]:
    """Prompts cut to the model's context, leaving `room` tokens to generate (and one
    for the [EOS] the decoder puts before a prompt)."""
    keep = (decoder.max_len or UNBOUNDED_CHECK + 1 + room) - 1 - room
    if keep < 1:
        raise ValueError(f"a context of {decoder.max_len} tokens leaves no room for a prompt "
                         f"and {room} new tokens")
    return [p[:keep] for p in prompts]


def cached_logits(decoder: Decoder, prompt: list[int], split: int) -> np.ndarray:
    """[EOS] + prompt[:split] as a prompt, then prompt[split:] one token at a time:
    each step's next-token logits [len(prompt) - split + 1, vocab]."""
    seq = decoder.start(prompt[:split])
    steps = [decoder.step([seq])[0]]
    for token in prompt[split:]:
        seq.pending = [token]
        steps.append(decoder.step([seq])[0])
    return np.stack(steps)


def torch_greedy(model: torch.nn.Module, decoder: Decoder, prompt: list[int],
                 new_tokens: int) -> tuple[list[int], list[float]]:
    """PyTorch's greedy continuation without a cache (every step a pass over the whole
    prefix), with each step's gap between its two best logits."""
    ids, gaps = [decoder.eos_id, *prompt], []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(torch.tensor([ids]))[0][0, -1].numpy().astype(np.float64)
            logits[decoder.banned] = -np.inf
            second, best = np.argsort(logits)[-2:]
            gaps.append(float(logits[best] - logits[second]))
            if best == decoder.eos_id:
                break
            ids.append(int(best))
    return ids[len(prompt) + 1:], gaps


def greedy_parity(model, decoder: Decoder, prompts: list[list[int]], new_tokens: int,
                  tie: float) -> dict:
    """Greedy continuations of the bundle and of PyTorch. Where they part at a step
    whose two best PyTorch logits are closer than `tie`, float noise chose: counted
    as a near tie, not a failure."""
    identical, ties, differ = 0, 0, []
    for i, prompt in enumerate(prompts):
        ours = generate(decoder, prompt, Sampling(max_new_tokens=new_tokens)).generated
        theirs, gaps = torch_greedy(model, decoder, prompt, new_tokens)
        if ours == theirs:
            identical += 1
            continue
        parted = next((j for j, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                      min(len(ours), len(theirs)))
        if parted < len(gaps) and gaps[parted] < tie:
            ties += 1
        else:
            differ.append(i)
    return {"prompts": len(prompts), "new_tokens": new_tokens, "identical": identical,
            "near_ties": ties, "different": differ}


def staggered_invariance(decoder: Decoder, prompts: list[list[int]], steps: int) -> float:
    """Largest logit change of a sequence between decoding alone and decoding in one
    batch that sequences 2i and 2i+1 join at step i (so prompts of different lengths
    join together, and pasts of every length meet).
    Both runs feed the same tokens (the alone run's greedy ones), so the logits can be
    compared step by step."""
    alone, tokens = [], []
    for prompt in prompts:
        seq, logs, chosen = decoder.start(prompt), [], []
        for _ in range(steps):
            logs.append(decoder.step([seq])[0].copy())
            row = logs[-1].copy()
            row[decoder.banned] = -np.inf
            chosen.append(int(row.argmax()))
            seq.pending = [chosen[-1]]
        alone.append(logs)
        tokens.append(chosen)
    seqs = [decoder.start(p) for p in prompts]
    done = [0] * len(prompts)
    worst = 0.0
    for tick in range(len(prompts) + steps):
        active = [i for i in range(len(prompts)) if i // 2 <= tick and done[i] < steps]
        if not active:
            break
        logits = decoder.step([seqs[i] for i in active])
        for row, i in zip(logits, active, strict=True):
            worst = max(worst, float(np.abs(row - alone[i][done[i]]).max()))
            seqs[i].pending = [tokens[i][done[i]]]
            done[i] += 1
    return worst


def read_meta(bundle_dir: Path) -> dict:
    return json.loads((Path(bundle_dir) / "bundle.json").read_text(encoding="utf-8"))


def decoders(bundle_dir: Path) -> dict[str, Decoder]:
    """The bundle's fp32 and int8 models, each behind the service's decoder."""
    meta = read_meta(bundle_dir)
    return {precision: Decoder(ort.InferenceSession(str(Path(bundle_dir) / name),
                                                    providers=["CPUExecutionProvider"]), meta)
            for precision, name in MODEL_FILES.items()}


def largest_diff(ours: list[np.ndarray], reference: list[np.ndarray]) -> float:
    return max(float(np.abs(a - b).max()) for a, b in zip(ours, reference, strict=True))


def parity_report(sessions: Mapping[str, Decoder], model: torch.nn.Module,
                  prompts: list[list[int]], new_tokens: int = 16, sample: int = 8,
                  tie: float = 1e-3) -> dict:
    """Every measurement, no verdict: `sessions` the fp32 and int8 decoders, `prompts`
    word-id lists (e.g. test blocks), `sample` of them for the decoding checks."""
    fp32, int8 = sessions["fp32"], sessions["int8"]
    model.eval()
    rows = fit(prompts, fp32)
    reference = torch_logits(model, rows, fp32.pad_id)
    ours = onnx_logits(fp32.session, rows, fp32.pad_id)
    quantised = onnx_logits(int8.session, rows, int8.pad_id)
    best = top1(reference)
    short = fit(prompts[:sample], fp32, room=new_tokens)
    cached = []
    for prompt in short:
        full = torch_logits(model, [[fp32.eos_id, *prompt]], fp32.pad_id)[0]
        split = max(1, len(prompt) // 2)
        cached.append(float(np.abs(cached_logits(fp32, prompt, split) - full[split:]).max()))
    # prompts of varied lengths, so that batching pads pasts and chunks
    varied = [p[: 1 + (3 * i) % max(1, len(p))] for i, p in enumerate(short)]
    return {
        "prompts": len(rows),
        "positions": int(best.size),
        "fp32_max_abs_diff": largest_diff(ours, reference),
        "int8_top1_agreement": float(np.mean(top1(quantised) == best)),
        "int8_max_abs_diff": largest_diff(quantised, reference),
        "cached_max_abs_diff": max(cached, default=0.0),
        "greedy": greedy_parity(model, fp32, short, new_tokens, tie),
        "batch_invariance_max_abs_diff": {
            precision: staggered_invariance(sessions[precision], varied, steps=4)
            for precision in ("fp32", "int8")},
    }


def check_parity(bundle: Path | Mapping[str, Decoder], model: torch.nn.Module,
                 prompts: list[list[int]], tolerances: Mapping, new_tokens: int = 16,
                 sample: int = 8) -> dict:
    """The report of `parity_report` for a bundle directory (or its fp32 and int8
    decoders); DeployError naming each check over its tolerance.

    `tolerances`: `fp32_max_abs_diff` (fp32 logits vs PyTorch, cached vs uncached, and
    fp32 batch invariance), `int8_min_agreement` (top-1 next token) and
    `int8_batch_max_abs_diff` (e.g. cfg.deploy).
    """
    sessions = decoders(bundle) if isinstance(bundle, str | Path) else bundle
    report = parity_report(sessions, model, prompts, new_tokens, sample,
                           tie=2 * tolerances["fp32_max_abs_diff"])
    fp32_allowed = tolerances["fp32_max_abs_diff"]
    problems = []
    if report["fp32_max_abs_diff"] > fp32_allowed:
        problems.append(f"fp32 ONNX next-token logits differ from PyTorch by "
                        f"{report['fp32_max_abs_diff']:.2e} (allowed {fp32_allowed:.0e})")
    if report["cached_max_abs_diff"] > fp32_allowed:
        problems.append(f"cached decoding's logits differ from one uncached pass by "
                        f"{report['cached_max_abs_diff']:.2e} (allowed {fp32_allowed:.0e})")
    if report["greedy"]["different"]:
        problems.append(f"greedy continuations differ from PyTorch's for prompts "
                        f"{report['greedy']['different']}")
    if report["int8_top1_agreement"] < tolerances["int8_min_agreement"]:
        problems.append(f"int8 top-1 next tokens agree with PyTorch at "
                        f"{report['int8_top1_agreement']:.4f} of positions (required "
                        f"{tolerances['int8_min_agreement']})")
    allowed = {"fp32": fp32_allowed, "int8": tolerances["int8_batch_max_abs_diff"]}
    for precision, diff in report["batch_invariance_max_abs_diff"].items():
        if diff > allowed[precision]:
            problems.append(f"{precision}: a sequence's logits change with its batch by "
                            f"{diff:.2e} (allowed {allowed[precision]:.0e})")
    if problems:
        raise DeployError("; ".join(problems))
    return report


def check_bundle(bundle_dir: Path, module, texts: list[str], cfg) -> dict:
    """Deploy's entry point: `texts` (e.g. the test documents) as a client sends them,
    encoded by the bundle's own tokenizer.json, against `module.model`, with
    cfg.deploy's tolerances."""
    prompts = NextWordInputs(Path(bundle_dir), read_meta(bundle_dir)).encode(texts)
    return check_parity(bundle_dir, module.model, [p for p in prompts if p],
                        cfg.deploy)
