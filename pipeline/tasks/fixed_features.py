"""Features that a model computes without learning, computed once per example.

A model whose first stage does not train (`model=scatter_linear`'s scattering transform,
`model=minilm` with `freeze_encoder`) exposes that stage as `fixed_features` and the
rest as `head`. Its task's data module then runs the stage over every example once,
before training, and its batches carry `features`, which the module passes to `head`
alone: an epoch costs the head's work, not the whole model's. What is exported and
served is the whole model, inputs to logits, as for any other.

Under differential privacy this is how the published recipes train (Tramer & Boneh
2021: a linear model on fixed features), and only the head's weights get per-example
gradients and noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

SPLITS = ("train", "val")  # what a fit reads; evaluate runs the whole model on the test


def built_quietly(build: Callable[[], object]) -> object:
    """`build()` with torch's random state put back afterwards: a model built only for
    its fixed stage must not change the weights and dropout draws of the one that
    trains (pl.seed_everything ran before either)."""
    with torch.random.fork_rng():
        return build()

EVERY_S = 10.0  # between progress lines


@torch.no_grad()
def compute(front: Callable[..., torch.Tensor], chunks: Sequence[tuple[torch.Tensor, ...]],
            total: int, name: str, every_s: float = EVERY_S) -> torch.Tensor:
    """`front(*chunk)` for each chunk of inputs, concatenated in order; a line every
    `every_s` seconds with the rate and the time left (a pass over a large split takes
    minutes). The time left is reckoned on the chunks' sizes (their first tensor's
    elements), not their examples: texts come in order of length, the longest last."""
    parts: list[torch.Tensor] = []
    done = work_done = 0
    work = sum(chunk[0].numel() for chunk in chunks)
    started = last = time.monotonic()
    for chunk in chunks:
        parts.append(front(*chunk))
        done += len(parts[-1])
        work_done += chunk[0].numel()
        now = time.monotonic()
        if now - last >= every_s and done < total:
            last, elapsed = now, now - started
            print(f"train: fixed features of the {name}: {done:,} of {total:,} "
                  f"({done / total:.0%}), {done / elapsed:,.0f} per second, "
                  f"{elapsed * (work - work_done) / work_done:.0f} s left", flush=True)
    return torch.cat(parts) if parts else torch.empty(0)
