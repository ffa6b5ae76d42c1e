"""Generation benchmark: POST /generate with continuous batching against serving one
request at a time and against a plain PyTorch loop without a cache (issue 27).

    python bench/bench_generation.py --bundle models/current \\
        --checkpoint models/checkpoints/best.ckpt [--seconds 10] [--prompts FILE]
    python bench/bench_generation.py --bundle DIR --quick     # a smoke run, not published

The bundle is a next-word bundle (bundle.json's task "next_word"); the checkpoint, the
Lightning checkpoint it was exported from (pipeline.tasks.next_word.inference), gives
the PyTorch baseline (left out, with a note on the page, when none is given). Every
request asks for 32 new tokens (--new-tokens), greedy. Measured in one run, each
setting twice, in order and then in reverse order, half the time each (the machine's
speed drifts over minutes), loopback only:

  1. the service (`python -m serving`, one worker, on a free port, stopped at the end)
     at concurrency 8: 8 keep-alive clients, each sending its next /generate as soon
     as the last is answered;
  2. the same service at concurrency 1 (one request at a time);
  3. the same service at concurrency 1, streamed (server-sent events): time to first
     token, from sending the request to its first `data:` event;
  4. a plain PyTorch loop without a cache: the checkpoint's model run over the whole
     prefix for every new token, greedy, one request at a time;
  5. the ceiling: the bundle's Decoder in this process, no HTTP, one sequence at a time
     and 8 at a time (continuous: a finished sequence's place is taken at the next step).

Tokens are counted, never assumed: the service's `usage.completion_tokens`, the
Decoder's own. Every request sets `min_new_tokens` to the tokens asked for, so [EOS]
does not end a continuation early; a prompt is kept only where its greedy continuation
(in-process, the service's int8 model) still has room in the model's context (if too
few do, the longest continuations fill up, and the tokens per request are reported). The
PyTorch loop makes exactly as many tokens per prompt as the bundle's greedy continuation
(its [EOS] banned until then), so every setting does the same work per request.

Prompts: --prompts FILE (one per line); else the bundle's own test documents, when
data/processed/ holds the split the bundle was trained from (profile.json's data hash
is bundle.json's lineage.data_hash), each cut to its first words; else a few built-in
Shakespeare-like lines. Reported: tokens/s of each setting, the ratios against the
targets (concurrency 8 at >= 3x one at a time and >= 5x the PyTorch loop) and time to
first token p50/p99 (target: p99 <= 50 ms). Only the setting under load runs (the
service is stopped, SIGSTOP, while this process measures). Publishes
bench/results/generation.json and docs/results/generation.md (not with --quick or
--no-publish: the page is printed instead).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_serving import CORES, HOST, our_service, version_of  # noqa: E402
from generation_load import Run, http_requests, service_load  # noqa: E402
from processes import freeze, thaw  # noqa: E402
from results import Plot, Result, Table, page, publish, stamp  # noqa: E402

from ops import control  # noqa: E402
from serving.bundle import Bundle  # noqa: E402
from serving.bundle.decoding import Decoder, generate  # noqa: E402
from serving.bundle.sampling import Sampling  # noqa: E402

CONCURRENCY = 8
TARGETS = {"c8_over_c1": 3.0, "c8_over_pytorch": 5.0}
TTFT_P99_TARGET_MS = 50.0
PROMPT_WORDS = 8  # a test document is cut to its first words
BUILT_IN = [  # Tiny Shakespeare-like openings (not the corpus's own lines)
    "first citizen : we are accounted poor citizens , the patricians",
    "what say you , my lord , to the",
    "i pray you , sir , tell me",
    "o , that this too too solid flesh would",
    "now is the time of our",
    "come , let us go and",
    "my gracious lord , i have",
    "good morrow , gentle friend . what news",
    "thou art a villain , and i",
    "the king hath sent for you , and",
    "he that will not hear the",
    "speak , and tell me what thou",
    "we know not what the gods",
    "if it be so , then let",
    "how now , what is the",
    "my heart is full of",
]

S_C8 = f"service, concurrency {CONCURRENCY}"
S_C1 = "service, concurrency 1"
S_STREAM = "service, concurrency 1, streamed"
TORCH = "PyTorch loop, no cache"
D_B8 = f"in-process Decoder, batch {CONCURRENCY}"
D_B1 = "in-process Decoder, batch 1"


# ---------------------------------------------------------------- measurements

def decoder_load(decoder: Decoder, prompts: list[list[int]], batch: int, new_tokens: int,
                 seconds: float) -> Run:
    """Continuous batching without HTTP: up to `batch` sequences advance together, and
    a finished one's place is taken by the next prompt at the next step."""
    run, turn, running = Run(), itertools.count(), []
    settings = Sampling(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    start = time.perf_counter()
    stop_at = start + seconds
    while True:
        while len(running) < batch and time.perf_counter() < stop_at:
            running.append((decoder.start(prompts[next(turn) % len(prompts)], settings),
                            time.perf_counter()))
        if not running:
            break
        decoder.advance([seq for seq, _ in running])
        now = time.perf_counter()
        for seq, began in running:
            if seq.finished:
                run.tokens += len(seq.generated)
                run.requests += 1
                run.latencies.append(now - began)
        running = [(seq, began) for seq, began in running if not seq.finished]
    run.seconds = time.perf_counter() - start
    return run


def torch_generate(model, ids: list[int], count: int, banned: list[int], max_len: int | None
                   ) -> list[int]:
    """`count` greedy tokens after `ids`, the model run over the whole prefix for each
    (no cache); `banned` ids never chosen (padding, [UNK], and [EOS]: the count is the
    bundle's continuation's, so each request does the same work as in the service)."""
    import torch

    ids, out = list(ids), []
    with torch.inference_mode():
        while len(out) < count and (max_len is None or len(ids) <= max_len):
            logits = model(torch.tensor([ids]), use_cache=False)[0][0, -1]
            logits[banned] = -float("inf")
            token = int(logits.argmax())
            out.append(token)
            ids.append(token)
    return out


def choose_threads(measure: Callable[[float], Run], seconds: float) -> int:
    """PyTorch's intra-op threads for its loop: one or every core, whichever makes more
    tokens/s over `seconds` each, so the baseline is its best (on a loaded 2-core
    machine, two threads that spin-wait for each other made it 10-100x slower than one).
    The choice stays set."""
    import torch

    rates = {}
    for threads in sorted({1, CORES}):
        torch.set_num_threads(threads)
        measure(0.0)  # one request: warm
        run = measure(seconds)
        rates[threads] = run.tokens / run.seconds
        print(f"  PyTorch with {threads} thread(s): {rates[threads]:.1f} tokens/s", flush=True)
    best = max(rates, key=rates.get)
    torch.set_num_threads(best)
    return best


def torch_load(model, prompts: list[list[int]], counts: list[int], decoder: Decoder,
               seconds: float) -> Run:
    """One request at a time through `torch_generate`, prompts in turn, for `seconds`."""
    run, turn = Run(), itertools.count()
    banned = [decoder.pad_id, decoder.unk_id, decoder.eos_id]
    start = time.perf_counter()
    while not run.requests or time.perf_counter() - start < seconds:  # one at least
        i = next(turn) % len(prompts)
        began = time.perf_counter()
        run.tokens += len(torch_generate(model, [decoder.eos_id, *prompts[i]], counts[i],
                                         banned, decoder.max_len))
        run.requests += 1
        run.latencies.append(time.perf_counter() - began)
    run.seconds = time.perf_counter() - start
    return run


# ---------------------------------------------------------------- prompts


def candidate_prompts(args, bundle: Bundle) -> tuple[list[str], str]:
    """(texts, where they came from): see the module docstring."""
    if args.prompts:
        lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip()], f"`{args.prompts}`"
    documents = ROOT / "data/processed/documents"
    profile = ROOT / "data/processed/profile.json"
    bundle_data = bundle.meta.get("lineage", {}).get("data_hash")
    if documents.is_dir() and profile.is_file() and bundle_data and json.loads(
            profile.read_text())["data"]["content_hash"] == bundle_data:
        from pipeline.data.splits import column, load_dataset_dir

        texts = column(load_dataset_dir(documents)["test"], "text")
        cut = [" ".join(t.split()[:PROMPT_WORDS]) for t in texts
               if len(t.split()) >= PROMPT_WORDS]
        if cut:
            return cut[:200], (f"the bundle's test documents (data/processed/documents), "
                               f"first {PROMPT_WORDS} words of each")
    return list(BUILT_IN), "built-in Shakespeare-like lines (bench/bench_generation.py)"


def choose_prompts(decoder: Decoder, texts: list[str], new_tokens: int, wanted: int
                   ) -> list[dict]:
    """Up to `wanted` prompts whose greedy continuation (in-process, the service's
    model) reaches `new_tokens` tokens; if too few do, the longest fill up. Each:
    text, ids, the continuation's length and why it ended."""
    room = None if decoder.max_len is None else decoder.max_len - 1 - new_tokens
    screened = []
    for text in dict.fromkeys(texts):  # in order, once each
        (ids,) = decoder.inputs.encode([text])
        if not ids or (room is not None and len(ids) > max(room, 1)):
            continue  # empty, or no room left for the new tokens in the context
        seq = generate(decoder, ids, Sampling(max_new_tokens=new_tokens,
                                              min_new_tokens=new_tokens))
        screened.append({"text": text, "ids": ids, "tokens": len(seq.generated),
                         "finish_reason": seq.finish_reason})
        if sum(p["tokens"] == new_tokens for p in screened) >= wanted:
            break
    if not screened:
        raise SystemExit(f"no prompt fits the model's context ({decoder.max_len} tokens, "
                         f"[EOS] first) with room for {new_tokens} new tokens: shorter "
                         "prompts (--prompts) or fewer new tokens (--new-tokens)")
    full = [p for p in screened if p["tokens"] == new_tokens]
    rest = sorted((p for p in screened if p["tokens"] < new_tokens),
                  key=lambda p: -p["tokens"])
    return (full + rest)[:wanted]


# ---------------------------------------------------------------- the run


def check_service(port: int, decoder: Decoder, prompts: list[dict], new_tokens: int) -> None:
    """The service's greedy continuations equal this process's (the same int8 model,
    one request at a time); a wrong service is not worth measuring."""
    for prompt in prompts[:3]:
        status, body = control.http_json(
            "POST", f"http://{HOST}:{port}/generate",
            {"prompt": prompt["text"], "max_new_tokens": new_tokens,
             "min_new_tokens": new_tokens, "temperature": 0.0},
            timeout=60)
        expected = decoder.inputs.words(generate(decoder, prompt["ids"], Sampling(
            max_new_tokens=new_tokens, min_new_tokens=new_tokens)).generated)
        if status != 200 or body.get("tokens") != expected:
            raise RuntimeError(f"the service's continuation of {prompt['text']!r} is not "
                               f"the bundle's: {status} {str(body)[:300]} (expected "
                               f"{expected})")


def line(name: str, r: dict) -> str:
    ttft = (f"  first token p50 {r['ttft_p50_ms']:6.1f} p99 {r['ttft_p99_ms']:6.1f} ms"
            if "ttft_p99_ms" in r else "")
    return (f"  {name:<36} {r['tokens_per_s']:9.1f} tokens/s  {r['requests']:5d} requests "
            f"x {r['tokens_per_request']:5.1f} tokens  latency p50 {r['p50_ms']:7.1f} "
            f"p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}{ttft}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="models/current")
    parser.add_argument("--checkpoint", default=None,
                        help="the Lightning checkpoint of the bundle's model (the PyTorch "
                        "baseline; left out without it)")
    parser.add_argument("--prompts", default=None, help="a file of prompts, one per line")
    parser.add_argument("--seconds", type=float, default=10.0, help="per setting")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--count", type=int, default=16, help="prompts used")
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke run (2 s per setting, 8 prompts), not published")
    parser.add_argument("--no-publish", action="store_true", help="print the page instead")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.count = min(args.seconds, 2.0), min(args.count, 8)

    bundle_dir = (ROOT / args.bundle).resolve()
    bundle = Bundle.load(bundle_dir, "int8")  # what the service serves (TEXTOPS_PRECISION)
    decoder = bundle.decoder
    if decoder is None:
        raise SystemExit(f"{bundle_dir}: a {bundle.task.name} bundle, not a next-word one")
    texts, source = candidate_prompts(args, bundle)
    print(f"bundle {bundle.version} ({bundle_dir}); choosing {args.count} prompts from "
          f"{len(texts)} ({source}) ...", flush=True)
    prompts = choose_prompts(decoder, texts, args.new_tokens, args.count)
    full = sum(p["tokens"] == args.new_tokens for p in prompts)
    print(f"  {len(prompts)} prompts, {full} of them continued to the full {args.new_tokens} "
          f"tokens (mean {np.mean([p['tokens'] for p in prompts]):.1f}), prompt tokens "
          f"{min(len(p['ids']) for p in prompts)}-{max(len(p['ids']) for p in prompts)}",
          flush=True)
    ids = [p["ids"] for p in prompts]

    model, skipped = None, None
    if args.checkpoint:
        from pipeline.tasks.next_word.inference import load_module

        module = load_module(Path(args.checkpoint))
        if module.hparams.vocab_size != decoder.vocab_size:
            raise SystemExit(f"{args.checkpoint}: vocabulary of {module.hparams.vocab_size}, "
                             f"the bundle's has {decoder.vocab_size}: not its checkpoint")
        model = module.model
    else:
        skipped = "no --checkpoint given: the PyTorch loop was not measured"
        print(f"  {skipped}", flush=True)

    half = args.seconds / 2
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        port = control.free_port()
        log = ROOT / "bench" / "results" / f"generation-{port}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"starting the service (1 worker) on port {port} ...", flush=True)
        _, process = stack.enter_context(our_service(bundle_dir, port, log, {
            "TEXTOPS_WORKERS": "1",
            "TEXTOPS_PREDICTION_LOG": f"sqlite:///{Path(tmp) / 'predictions.db'}",
            "TEXTOPS_MAX_NEW_TOKENS": str(max(128, args.new_tokens))}))
        stack.callback(thaw, process)  # before it is stopped (the stack runs backwards)
        check_service(port, decoder, prompts, args.new_tokens)
        plain = http_requests([p["text"] for p in prompts], args.new_tokens, False)
        streamed = http_requests([p["text"] for p in prompts], args.new_tokens, True)

        def frozen(measure: Callable[[float], Run]) -> Callable[[float], Run]:
            """`measure` in this process, the service stopped meanwhile (only the
            setting under load runs)."""
            def run(seconds: float) -> Run:
                freeze(process)
                try:
                    return measure(seconds)
                finally:
                    thaw(process)
            return run

        settings: dict[str, Callable[[float], Run]] = {
            S_C8: lambda s: service_load(port, plain, CONCURRENCY, s),
            S_C1: lambda s: service_load(port, plain, 1, s),
            S_STREAM: lambda s: service_load(port, streamed, 1, s, streamed=True),
            D_B8: frozen(lambda s: decoder_load(decoder, ids, CONCURRENCY, args.new_tokens, s)),
            D_B1: frozen(lambda s: decoder_load(decoder, ids, 1, args.new_tokens, s)),
        }
        if model is not None:
            counts = [p["tokens"] for p in prompts]
            settings[TORCH] = frozen(lambda s: torch_load(model, ids, counts, decoder, s))
        print("warming up ...", flush=True)
        for name, measure in settings.items():
            if name != TORCH:
                measure(min(1.0, half / 2))
        if model is not None:
            torch_threads = frozen(lambda s: choose_threads(
                lambda t: torch_load(model, ids, counts, decoder, t), s))(min(1.0, half / 2))
        runs: dict[str, Run] = {}
        order = [*settings, *reversed(settings)]
        for i, name in enumerate(order):
            run = settings[name](half)
            runs[name] = runs[name] + run if name in runs else run
            print(f"[{i + 1}/{len(order)}]" + line(name, run.summary())[1:], flush=True)
    results = {name: runs[name].summary() for name in settings}
    report(args, bundle, source, prompts, results, skipped,
           torch_threads if model is not None else None)


def report(args, bundle: Bundle, source: str, prompts: list[dict], results: dict,
           skipped: str | None, torch_threads: int | None) -> None:
    def rate(name):
        return results.get(name, {}).get("tokens_per_s") or None

    ratios = {"c8_over_c1": rate(S_C8) / rate(S_C1) if rate(S_C1) else None,
              "c8_over_pytorch": rate(S_C8) / rate(TORCH) if rate(TORCH) else None,
              "service_c8_over_decoder_b8": rate(S_C8) / rate(D_B8) if rate(D_B8) else None,
              "service_c1_over_decoder_b1": rate(S_C1) / rate(D_B1) if rate(D_B1) else None}
    ttft = results[S_STREAM]
    print("\nTokens per second, both halves together:")
    for name, r in results.items():
        print(line(name, r))
    verdicts = []
    print()
    for key, what in (("c8_over_c1", f"concurrency {CONCURRENCY} over one at a time"),
                      ("c8_over_pytorch", f"concurrency {CONCURRENCY} over the PyTorch loop")):
        value, target = ratios[key], TARGETS[key]
        verdict = ("not measured" if value is None
                   else "meets" if value >= target else "MISSES")
        verdicts.append([what, "-" if value is None else f"{value:.2f}x", f">= {target:g}x",
                         verdict])
    p99 = ttft.get("ttft_p99_ms")
    verdicts.append(["time to first token p99, concurrency 1",
                     "-" if p99 is None else f"{p99:.1f} ms", f"<= {TTFT_P99_TARGET_MS:g} ms",
                     "not measured" if p99 is None
                     else "meets" if p99 <= TTFT_P99_TARGET_MS else "MISSES"])
    for what, value, target, verdict in verdicts:
        print(f"  {what:<44} {value:>9}   target {target:<9} {verdict}")
    for key in ("service_c8_over_decoder_b8", "service_c1_over_decoder_b1"):
        if ratios[key]:
            print(f"  {key.replace('_', ' '):<44} {ratios[key]:8.2f}x   (the ceiling: no HTTP)")
    payload = {
        "args": vars(args), "bundle": {"version": bundle.version, "path": args.bundle,
                                       "precision": bundle.precision,
                                       "max_len": bundle.decoder.max_len},
        "prompts": {"source": source, "count": len(prompts),
                    "texts": [p["text"] for p in prompts],
                    "prompt_tokens": [len(p["ids"]) for p in prompts],
                    "continuation_tokens": [p["tokens"] for p in prompts],
                    "finish_reasons": [p["finish_reason"] for p in prompts]},
        "service": {"workers": 1, "precision": "int8", "max_running": 64,
                    "versions": {d: version_of(d) for d in
                                 ("onnxruntime", "uvicorn", "fastapi", "torch")}},
        "pytorch_threads": torch_threads, "results": results, "ratios": ratios,
        "targets": TARGETS,
        "ttft_p99_target_ms": TTFT_P99_TARGET_MS, "not_measured": skipped}
    result = as_result(payload, verdicts)
    if args.quick or args.no_publish:
        result.stamp = stamp()
        print("\n" + page(result))
        print("(not published: --quick / --no-publish)")
    else:
        print(f"\nwrote {publish(result).relative_to(ROOT)}")


def as_result(payload: dict, verdicts: list[list]) -> Result:
    args, results, prompts = payload["args"], payload["results"], payload["prompts"]
    new_tokens = args["new_tokens"]
    command = f"python bench/bench_generation.py --bundle {args['bundle']}"
    if args["checkpoint"]:
        command += f" --checkpoint {args['checkpoint']}"
    if args["prompts"]:
        command += f" --prompts {args['prompts']}"
    for option, default in (("seconds", 10.0), ("new_tokens", 32), ("count", 16)):
        if args[option] != default:
            command += f" --{option.replace('_', '-')} {args[option]:g}"
    full = sum(t == new_tokens for t in prompts["continuation_tokens"])
    threads = (f", {payload['pytorch_threads']} intra-op thread(s): the faster of 1 and "
               f"{CORES}" if payload["pytorch_threads"] else "")
    about = f"""POST /generate on the next-word bundle `{payload['bundle']['version']}`
(int8, as served), {new_tokens} new tokens per request, greedy, over loopback: the
service (one worker, continuous batching) at concurrency {CONCURRENCY} against the same
service one request at a time and against a plain PyTorch loop without a cache (the
training checkpoint's model run over the whole prefix for every new token, one request
at a time{threads}); time to first token is measured over streamed requests (server-sent events)
at concurrency 1, from sending the request to its first `data:` event. The bundle's
Decoder called in the benchmark's own process, without HTTP, is the ceiling. Each
setting ran for {args['seconds']:g} s, in two halves (in order, then in reverse order);
only the setting under load ran. Tokens are counted from the answers
(`usage.completion_tokens`): /generate ends at [EOS], so the {prompts['count']} prompts
({prompts['source']}) were chosen for greedy continuations that reach {new_tokens}
tokens ({full} of {prompts['count']} do), and the PyTorch loop makes as many tokens per
prompt as the bundle's continuation. Run again: `{command}`."""
    if payload["not_measured"]:
        about += f"\n\nNot measured: {payload['not_measured']}."
    throughput = Table(
        f"Tokens per second ({new_tokens} new tokens per request, greedy)",
        ["setting", "tokens/s", "requests", "tokens/request", "latency p50 ms",
         "latency p99 ms", "errors"],
        [[name, round(r["tokens_per_s"], 1), r["requests"], round(r["tokens_per_request"], 1),
          round(r["p50_ms"], 1), round(r["p99_ms"], 1), r["errors"]]
         for name, r in results.items()])
    targets = Table("Against the targets", ["what", "measured", "target", "verdict"],
                    verdicts)
    stream = results[S_STREAM]
    first = Table("Time to first token, concurrency 1, streamed (ms)",
                  ["p50", "p99", "max", "requests"],
                  [[round(stream.get("ttft_p50_ms", 0), 1),
                    round(stream.get("ttft_p99_ms", 0), 1),
                    round(stream.get("ttft_max_ms", 0), 1), stream["requests"]]])
    plot = Plot("Tokens per second", "bar", "setting", "tokens/s",
                {"tokens/s": [[name.replace("service, ", "").replace("in-process ", ""),
                               r["tokens_per_s"]] for name, r in results.items()]})
    headlines = [f"generation, tokens/s at concurrency {CONCURRENCY} over one at a time",
                 f"generation, tokens/s at concurrency {CONCURRENCY} over PyTorch without "
                 "a cache", "generation, time to first token p99 at concurrency 1"]
    summary = [[what, verdict[1]] for what, verdict in zip(headlines, verdicts, strict=True)
               if verdict[1] != "-"]  # a setting not measured has no headline
    return Result("generation", "Generation: continuous batching against one at a time",
                  about, [throughput, targets, first], [plot], data=payload,
                  summary=summary)


if __name__ == "__main__":
    main()
