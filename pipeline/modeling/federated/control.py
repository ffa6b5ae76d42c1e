"""SCAFFOLD's control variates (Karimireddy et al. 2020, "SCAFFOLD: stochastic
controlled averaging for federated learning"), `trainer.federated.control_variates`:
each local step is corrected by how the client's own steps differ from the
federation's, so a client whose rows hold a few classes does not drift toward them
over its local steps.

- A client keeps c_i, its mean step per unit learning rate over the last round it
  trained: the distance its weights moved, less the corrections, over the rates
  summed (the paper's cheap estimate, option II, with the schedule's rates).
- The server keeps the latest c_i of every client still connected and sends c, their
  average weighted by rows (as FedAvg weighs the clients' objectives). A client that
  left no longer counts: its old steps would pull the others toward its rows.
- Beside each local step the weights move by the step's rate times c - c_i: the
  client's own mean step swapped for the federation's. A client with no c_i yet (its
  first round) trains uncorrected.

The paper corrects the gradient (g + c - c_i, with c_i a mean gradient), which with
plain SGD is the same thing. With AdamW it is not: the optimiser divides the
corrected gradient by its own running scale, so a correction larger than the
gradient's noise becomes a full-rate step of its own in every weight (measured:
docs/configuration.md, "Federated training"). Steps are on the same scale whatever
the optimiser.

c travels to the clients in the round's fit config and each c_i back in the client's
fit metrics, both as bytes (`pack`), so client processes carry them over gRPC as the
clients of a simulation do in one process.
"""

from __future__ import annotations

import io

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

KEY = "control_variate"  # in the fit config (c) and the fit metrics (c_i)


def pack(arrays: list[np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, *arrays)
    return buffer.getvalue()


def unpack(data: bytes) -> list[np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return [archive[f"arr_{i}"] for i in range(len(archive.files))]


class ControlledSteps(Callback):
    """A client's side: its c_i, kept from round to round, and this round's c
    (`federation`, set before each local fit); moves the weights by the rate times
    c - c_i beside each optimiser step and measures the next c_i."""

    def __init__(self):
        self.own: list[torch.Tensor] | None = None  # c_i, from this client's last round
        self.federation: list[torch.Tensor] | None = None  # c, this round's
        self.start: list[torch.Tensor] = []  # the weights the round started from
        self.shifts: list[torch.Tensor] | None = None  # c - c_i, on the weights' device
        self.rate_sums: list[float] = []  # each weight's rates over the round, summed

    def receive(self, packed: bytes | None) -> None:
        """This round's c from the server's config (None before any client reported)."""
        self.federation = (None if packed is None else
                           [torch.from_numpy(array) for array in unpack(packed)])

    def report(self) -> dict:
        """The fit metrics that carry c_i back to the server (none before a round)."""
        if self.own is None:
            return {}
        return {KEY: pack([value.numpy() for value in self.own])}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = list(pl_module.model.parameters())
        if self.federation is not None:
            shapes = [tuple(p.shape) for p in params]
            sent = [tuple(c.shape) for c in self.federation]
            if sent != shapes:
                raise ValueError(f"federated: the server's control variate has shapes "
                                 f"{sent[:3]}... for a model with {shapes[:3]}... "
                                 "(client and server built different models)")
        self.start = [p.detach().clone() for p in params]
        self.rate_sums = [0.0] * len(params)
        correcting = self.federation is not None and self.own is not None
        self.shifts = ([(c - own).to(p.device, p.dtype)
                        for c, own, p in zip(self.federation, self.own, params, strict=True)]
                       if correcting else None)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer) -> None:
        params = list(pl_module.model.parameters())
        # a step whose gradient overflowed, which a mixed-precision scaler skips: no
        # correction and no rate counted either
        if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in params):
            return
        # the rate this step takes (the scheduler moves it after the step), for the
        # weights the optimiser steps (those with a gradient)
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        rates = [float(group_of[id(p)]["lr"]) if id(p) in group_of and p.grad is not None
                 else 0.0 for p in params]
        self.rate_sums = [total + rate for total, rate in zip(self.rate_sums, rates,
                                                               strict=True)]
        if self.shifts is None:
            return
        with torch.no_grad():
            for param, shift, rate in zip(params, self.shifts, rates, strict=True):
                if rate:
                    param.sub_(shift, alpha=rate)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning calls this only when the fit ended well: a round that broke leaves
        # the last c_i
        if not any(self.rate_sums):
            return
        with torch.no_grad():
            # the round's own mean step per unit rate: the distance moved, less the
            # corrections, which moved every weight by rate * (c - c_i) at each step
            # (a weight no step moved: none, and no correction to take back either)
            shifts = self.shifts or [0.0] * len(self.start)
            moved = [(before - param.detach()) / total - shift if total
                     else torch.zeros_like(before)
                     for before, param, total, shift in zip(
                         self.start, pl_module.model.parameters(), self.rate_sums, shifts,
                         strict=True)]
        if all(torch.isfinite(m).all() for m in moved):  # else the last c_i stays
            self.own = [m.float().cpu() for m in moved]


class FederationControls:
    """The server's side: every client's latest c_i with its rows and connection, and
    c, the rows-weighted average over the clients still connected, for the next
    round's config."""

    def __init__(self):
        # client number -> (the connection's id, rows, c_i)
        self.latest: dict[int, tuple[str, int, list[np.ndarray]]] = {}

    def update(self, results: list) -> None:
        """Take the c_i in a round's fit results ((proxy, FitRes) pairs); one that is
        not finite is refused (the client's earlier one stays)."""
        for proxy, res in results:
            if KEY in res.metrics:
                arrays = unpack(res.metrics[KEY])
                if all(np.isfinite(a).all() for a in arrays):
                    self.latest[int(res.metrics["client"])] = (proxy.cid, res.num_examples,
                                                               arrays)

    def federation(self, connected: set[str]) -> bytes | None:
        """c over the clients whose connections (`connected`, ids) are still there,
        packed for the fit config; None while none of them has reported."""
        # in client order: the same sums whichever reported first
        kept = [(rows, arrays) for cid, rows, arrays in map(self.latest.get, sorted(self.latest))
                if cid in connected]
        if not kept:
            return None
        total = sum(rows for rows, _ in kept)
        return pack([sum(rows / total * arrays[i] for rows, arrays in kept).astype(np.float32)
                     for i in range(len(kept[0][1]))])
