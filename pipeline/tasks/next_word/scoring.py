"""How a next-word model is scored: perplexity and top-1 / top-5 next-word accuracy on
the test split's token stream, beside an interpolated Kneser-Ney n-gram fitted on the
training split's stream and scored on the same tokens in the same run.

`perplexity` is per token of the candidate's own tokenizer; `perplexity_per_word`
divides the same total log-loss by the test text's whitespace-separated words, a
count no tokenizer changes, so that it compares models with different vocabularies.
The champion is scored that way: its bundle encodes the test documents with its own
tokenizer, and the gate's champion margin reads `perplexity_per_word`.
`perplexity_vs_baseline` is the candidate's perplexity over the n-gram's, on the very
same tokens (the product's target: at most 0.8).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from omegaconf import DictConfig

from pipeline import atomic
from pipeline.data.splits import column
from pipeline.reporting import figures
from pipeline.tasks.next_word import export
from pipeline.tasks.next_word.evaluation import lm_metrics
from pipeline.tasks.next_word.inference import logits_fn
from pipeline.tasks.next_word.ngram import KneserNey, stream_of
from pipeline.tasks.next_word.preprocess import pack, stream
from pipeline.tasks.next_word.processed import profile_of, prompts
from pipeline.tasks.scoring import Scored, Scoring

HEADLINE = ("perplexity", "perplexity_per_word", "accuracy", "top5_accuracy",
            "cross_entropy")


def onnx_logits(session: ort.InferenceSession, pad_id: int):
    """The same from a bundle's ONNX model with an empty cache: whole blocks at once, or
    a token at a time carrying the cache for a graph that takes one (the LSTM's)."""
    def logits(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        rows = [row[:int(real.sum())].tolist() for row, real in zip(ids, mask, strict=True)]
        out = np.zeros((*ids.shape, session.get_outputs()[0].shape[-1]), np.float32)
        for i, row in enumerate(export.onnx_logits(session, rows, pad_id, len(rows))):
            out[i, :len(row)] = row
        return out
    return logits


def named(measured: dict) -> dict:
    """lm_metrics' figures under the names the gate, registry and report share
    (top-1 next-word accuracy is `accuracy`)."""
    out = dict(measured)
    out["accuracy"] = out.pop("top1_accuracy")
    return out


class NextWordScoring(Scoring):
    lower_is_better = frozenset({"perplexity", "perplexity_per_word", "cross_entropy",
                                 "perplexity_vs_baseline"})

    def score(self, task, module, splits, paths, cfg) -> Scored:
        profile = profile_of(paths)
        words = profile["splits"]["test"]["words"]
        blocks = column(splits["test"], "ids")
        batch = cfg.evaluate.batch_size
        metrics = {"rows": len(blocks),
                   **named(lm_metrics(logits_fn(module), blocks, batch, words))}
        baseline = cfg.evaluate.baseline
        ngram = KneserNey(order=baseline.order, discount=baseline.discount).fit(
            stream_of(column(splits["train"], "ids")), profile["tokenizer"]["vocab_size"])
        metrics["baseline"] = {"name": f"kneser_ney_{baseline.order}",
                               **named(ngram.score(blocks, words=words))}
        metrics["perplexity_vs_baseline"] = (metrics["perplexity"]
                                             / metrics["baseline"]["perplexity"])
        # The same figures on validation: what choices (tokenizer, model, the baseline's
        # order and discount) are made on, so that the test split is never tuned to.
        val_blocks, val_words = column(splits["val"], "ids"), profile["splits"]["val"]["words"]
        validation = named(lm_metrics(logits_fn(module), val_blocks, batch, val_words))
        val_baseline = ngram.score(val_blocks, words=val_words)
        validation["baseline_perplexity"] = val_baseline["perplexity"]
        validation["baseline_perplexity_per_word"] = val_baseline["perplexity_per_word"]
        metrics["validation"] = validation
        requests = {"documents": prompts(paths, "test"), "words": words,
                    "block_size": profile["block_size"]}
        return Scored(metrics, requests=requests)

    def score_bundle(self, bundle_dir: Path, scored: Scored, cfg: DictConfig) -> dict:
        """The champion on the same test text through its own tokenizer; its
        perplexity per word is comparable, its per-token figures only when it shares
        the candidate's tokenizer."""
        from serving.bundle import Bundle

        bundle = Bundle.load(bundle_dir, precision="fp32")
        if bundle.task.name != "next_word":
            raise ValueError(f"it is a {bundle.task.name} bundle")
        ids = bundle.inputs.encode(scored.requests["documents"])
        size = scored.requests["block_size"]
        if bundle.meta.get("max_len"):
            size = min(size, bundle.meta["max_len"] - 1)
        blocks = [b.tolist() for b in pack(stream(ids, bundle.meta["special"]["eos_id"]), size)]
        pad_id = bundle.meta["special"]["pad_id"]
        return named(lm_metrics(onnx_logits(bundle.session, pad_id), blocks,
                                cfg.evaluate.batch_size, scored.requests["words"], pad_id))

    def write_plots(self, plots_dir: Path, scored: Scored, cfg: DictConfig) -> None:
        """The candidate beside the n-gram baseline (perplexity and accuracy), as plot
        data and a picture."""
        m = scored.metrics
        rows = [{"model": name, "perplexity": round(values["perplexity"], 4),
                 "accuracy": round(values["accuracy"], 4),
                 "top5_accuracy": round(values["top5_accuracy"], 4)}
                for name, values in (("candidate", m), (m["baseline"]["name"], m["baseline"]))]
        picture = figures.bars_png(
            [r["model"] for r in rows], [r["perplexity"] for r in rows],
            f"test perplexity (lower is better): {m['perplexity_vs_baseline']:.2f}x the "
            "baseline's")
        with atomic.atomic_dir(plots_dir) as tmp:
            atomic.write_json(tmp / "baseline.json", rows)
            (tmp / "baseline.png").write_bytes(picture)

    def logged(self, metrics: dict) -> dict[str, float]:
        flat = {f"test_{k}": float(metrics[k]) for k in (*HEADLINE, "perplexity_vs_baseline")}
        flat.update({f"baseline_{k}": float(metrics["baseline"][k]) for k in HEADLINE})
        if "validation" in metrics:  # a champion scored on test alone has none
            flat.update({f"val_{k}": float(metrics["validation"][k]) for k in HEADLINE})
        return flat

    def summary(self, metrics: dict) -> str:
        base = metrics["baseline"]
        return (f"perplexity {metrics['perplexity']:.2f} ({metrics['perplexity_vs_baseline']:.2f}"
                f"x the {base['name']} baseline's {base['perplexity']:.2f}), top-1 accuracy "
                f"{metrics['accuracy']:.4f}, top-5 {metrics['top5_accuracy']:.4f}")

    def card(self, metrics: dict) -> str:
        base = metrics["baseline"]
        lines = "\n".join(
            f"| {name} | {values['perplexity']:.2f} | {values['perplexity_per_word']:.2f} | "
            f"{values['accuracy']:.4f} | {values['top5_accuracy']:.4f} |"
            for name, values in (("this model", metrics), (base["name"], base)))
        return (f"{metrics['tokens']} test tokens. Perplexity "
                f"{metrics['perplexity_vs_baseline']:.2f}x that of an interpolated "
                "Kneser-Ney n-gram fitted on the same training text, scored on the same "
                "tokens.\n\n| model | perplexity | per word | top-1 accuracy | top-5 "
                f"accuracy |\n|---|---|---|---|---|\n{lines}")

