"""Which training rows each federated client holds.

- `iid`: a seeded shuffle dealt out in equal parts, the setting where federated
  averaging equals centralised training most closely;
- `dirichlet`: label skew, the usual simulation of clients that see different things
  (Hsu et al. 2019): for each class, the shares of its rows that go to each client are
  drawn from Dirichlet(alpha); a small alpha (0.1) gives clients a class or two, a
  large one (100) approaches iid;
- `group`: the processed split's `group` column (`data.group_column`: a user, a site),
  whole groups dealt to clients, the largest first, each to the client holding fewest
  rows, so no source straddles two clients.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from omegaconf import DictConfig


class PartitionError(ValueError):
    """The partition cannot be made from this data and configuration."""


def partition(settings: DictConfig, clients: int, labels: list | None, groups: list | None,
              rows: int, seed: int) -> list[list[int]]:
    """Row indices of the training split per client, each list sorted; every row is in
    exactly one list. `labels` (for `dirichlet`) and `groups` (for `group`) are the
    training split's columns; None where the split has none."""
    how = settings.by
    if clients < 1:
        raise PartitionError(f"trainer.federated.clients must be at least 1, not {clients}")
    rng = np.random.default_rng(seed)
    if how == "iid":
        parts = np.array_split(rng.permutation(rows), clients)
    elif how == "dirichlet":
        if labels is None:
            raise PartitionError("trainer.federated.partition.by=dirichlet skews labels, "
                                 "and this task's training rows have none: use iid")
        parts = dirichlet(np.asarray(labels), clients, float(settings.alpha), rng)
    elif how == "group":
        if groups is None:
            raise PartitionError("trainer.federated.partition.by=group needs the training "
                                 "split's groups: set data.group_column")
        parts = by_group(groups, clients, rng)
    else:
        raise PartitionError(f"trainer.federated.partition.by: {how!r} is not one of "
                             "iid, dirichlet, group")
    parts = [sorted(int(i) for i in part) for part in parts]
    empty = [i for i, part in enumerate(parts) if not part]
    if empty:
        raise PartitionError(f"trainer.federated: client(s) {empty} get no training rows "
                             f"({rows} rows, {clients} clients, partition {how}); use "
                             "fewer clients or a larger partition.alpha")
    return parts


def dirichlet(labels: np.ndarray, clients: int, alpha: float,
              rng: np.random.Generator) -> list[np.ndarray]:
    """Each class's rows split across clients in Dirichlet(alpha) shares. Redrawn (up
    to 100 times) until every client holds at least a batch's worth of rows relative to
    its fair share, as the common reference implementations do, so that no client is
    left with nothing to train on."""
    if alpha <= 0:
        raise PartitionError(f"trainer.federated.partition.alpha must be > 0, not {alpha}")
    least = max(1, min(10, len(labels) // (clients * 10)))
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for label in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
            for client, chunk in enumerate(np.split(rows, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(part) for part in parts) >= least:
            break
    return [np.asarray(part, dtype=np.int64) for part in parts]


def by_group(groups: list, clients: int, rng: np.random.Generator) -> list[list[int]]:
    members: dict = {}
    for row, group in enumerate(groups):
        members.setdefault(group, []).append(row)
    if len(members) < clients:
        raise PartitionError(f"trainer.federated: {len(members)} group(s) for {clients} "
                             "clients; every client needs a group of its own")
    order = list(members)
    rng.shuffle(order)  # ties in size broken by the seed, not by the data's order
    order.sort(key=lambda group: -len(members[group]))
    parts: list[list[int]] = [[] for _ in range(clients)]
    for group in order:
        min(parts, key=len).extend(members[group])
    return parts


def describe(parts: list[list[int]], labels: list | None) -> list[dict]:
    """Per client: its rows and, for labelled rows, how many of each label (the skew
    the run trained under, for the train report)."""
    summary = []
    for client, part in enumerate(parts):
        entry = {"client": client, "rows": len(part)}
        if labels is not None:
            counts = Counter(labels[i] for i in part)
            entry["labels"] = {str(label): counts[label] for label in sorted(counts)}
        summary.append(entry)
    return summary
