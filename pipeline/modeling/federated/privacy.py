"""Client-level differential privacy for federated training (DP-FedAvg, McMahan et al.
2018, "Learning Differentially Private Recurrent Language Models").

`trainer.federated.privacy.enabled` protects a whole client, every row it holds at
once: each round the server clips every client's update (its weights minus the global
weights) to `clipping_norm`, sums them, divides by the number of clients a round asks
(fixed, so one client moves the average by at most clipping_norm / that number, whoever
else answered), and adds Gaussian noise of `noise_multiplier x clipping_norm / that
number`. The noise multiplier is the smallest that keeps the configured rounds within
`epsilon` at `delta` by Opacus's accountant; a round counts once it releases a model.
Every round counts as if every client took part (sampling rate 1): Flower picks the
clients a round asks from a generator the public seed sets, so who is asked is no
secret and lends no amplification. Given the partition (which clients hold which
rows), client-level (epsilon, delta)-DP implies the same bound for any one row.

The noise is drawn from a generator seeded from the operating system's randomness, not
from `seed` (which params.yaml shows). A model with buffers (BatchNorm's running
statistics) is refused: they are measured on the clients' rows and would travel
unclipped and without noise. What each round reports of the clients (training loss,
rows) and the train report's per-client row and label counts are left out of a
private run's records (run.py, server.py).
"""

from __future__ import annotations

import secrets

import numpy as np
from omegaconf import DictConfig
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier


def enabled(settings: DictConfig) -> bool:
    privacy = settings.get("privacy")
    return bool(privacy and privacy.get("enabled"))


class ClientLevelPrivacy:
    """The clipped, noised average of each round and the privacy it has spent."""

    def __init__(self, settings: DictConfig, clients: int, rounds: int):
        privacy = settings.privacy
        self.asked = max(int(settings.min_clients), int(clients * float(settings.fraction_fit)))
        self.sample_rate = 1.0  # the module docstring: no secret sampling, no amplification
        self.delta = float(privacy.delta)
        self.clipping_norm = float(privacy.clipping_norm)
        self.accountant = str(privacy.accountant)
        self.noise_multiplier = get_noise_multiplier(
            target_epsilon=float(privacy.epsilon), target_delta=self.delta,
            sample_rate=self.sample_rate, steps=rounds, accountant=self.accountant)
        self.released = 0
        self.rng = np.random.default_rng(secrets.randbits(128))

    def aggregate(self, current: list[np.ndarray], updates: list[list[np.ndarray]]
                  ) -> list[np.ndarray]:
        """The next global weights from the current ones and each answering client's."""
        total = [np.zeros_like(array, dtype=np.float64) for array in current]
        for weights in updates:
            deltas = [w.astype(np.float64) - c for w, c in zip(weights, current, strict=True)]
            norm = float(np.sqrt(sum(np.sum(d * d) for d in deltas)))
            scale = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
            for summed, delta in zip(total, deltas, strict=True):
                summed += scale * delta
        std = self.noise_multiplier * self.clipping_norm  # on the sum, one client's reach
        self.released += 1
        return [(c + (s + self.rng.normal(0.0, std, s.shape)) / self.asked).astype(c.dtype)
                for c, s in zip(current, total, strict=True)]

    def record(self) -> dict:
        """What the rounds released so far have spent, as the model card and the gate
        read a privacy record (pipeline/tracking/privacy.py)."""
        accountant = create_accountant(self.accountant)
        accountant.history = [(self.noise_multiplier, self.sample_rate, self.released)]
        epsilon = accountant.get_epsilon(self.delta) if self.released else 0.0
        return {"unit": "client", "epsilon": float(epsilon), "delta": self.delta,
                "noise_multiplier": float(self.noise_multiplier),
                "clipping_norm": self.clipping_norm, "sample_rate": self.sample_rate,
                "steps": self.released, "accountant": self.accountant}
