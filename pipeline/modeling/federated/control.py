"""SCAFFOLD's control variates (Karimireddy et al. 2020, "SCAFFOLD: stochastic
controlled averaging for federated learning"), `trainer.federated.control_variates`:
each local step's gradient is corrected by how the client's own gradient differs
from the federation's, so a client whose rows hold a few classes does not drift
toward them over its local steps.

- A client keeps c_i, the mean of the raw gradients of the last round it trained
  (steps whose gradient was not finite left out). With plain SGD at a constant rate
  that equals the paper's cheap estimate (option II, the distance moved over the
  steps taken times the rate); unlike that it stays defined for AdamW, whose steps
  are not the rate times the gradient.
- The server keeps the latest c_i of every client still connected and sends c, their
  average weighted by rows (as FedAvg weighs the clients' objectives). A client that
  left no longer counts: its old gradient would pull the others toward its rows.
- Each local step's gradient g becomes g + c - c_i: the client's own pull swapped for
  the federation's. A client with no c_i yet (its first round) trains uncorrected.

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


class ControlledGradients(Callback):
    """A client's side: its c_i, kept from round to round, and this round's c
    (`federation`, set before each local fit); corrects each step's gradient (before
    clipping and the optimiser's step) and measures the next c_i."""

    def __init__(self):
        self.own: list[torch.Tensor] | None = None  # c_i, from this client's last round
        self.federation: list[torch.Tensor] | None = None  # c, this round's
        self.summed: list[torch.Tensor] = []
        self.shifts: list[torch.Tensor] | None = None  # c - c_i, on the weights' device
        self.steps = 0

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
        self.summed = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.steps = 0
        correcting = self.federation is not None and self.own is not None
        self.shifts = ([(c - own).to(p.device, p.dtype)
                        for c, own, p in zip(self.federation, self.own, params, strict=True)]
                       if correcting else None)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer) -> None:
        grads = [p.grad for p in pl_module.model.parameters()]
        # a step whose gradient overflowed (a mixed-precision scaler skips it) would
        # make c_i, and through the server every client's c, not a number
        if all(g is None or torch.isfinite(g).all() for g in grads):
            for total, grad in zip(self.summed, grads, strict=True):
                if grad is not None:
                    total += grad.detach().float()
            self.steps += 1
        if self.shifts is not None:
            for grad, shift in zip(grads, self.shifts, strict=True):
                if grad is not None:
                    grad.add_(shift)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # only a round that ran to its end replaces c_i (a broken one leaves it)
        if self.steps:
            self.own = [(total / self.steps).cpu() for total in self.summed]


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
