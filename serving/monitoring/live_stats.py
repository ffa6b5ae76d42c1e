"""The live-quality figures that the prediction log's labels give: `LiveStats`.

A plain value, computed by the prediction log's store (serving/predlog/store.py) and
shown by the metrics (serving/monitoring/quality.py). It lives with the metrics and
imports nothing of the service, so the log depends on monitoring and never the
other way round.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class LiveStats:
    """What the latest labels say about the served answers."""

    labels: int = 0  # labels the accuracy rests on
    correct: int = 0
    recall: dict[str, float] = field(default_factory=dict)  # per true label
    logged: int = 0  # predictions in the retention window
    answered: int = 0  # of those, the ones that received a label
    as_of: float = 0.0  # time.monotonic() when the reading began

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]], logged: int, answered: int
                   ) -> LiveStats:
        """From (label, predicted) pairs."""
        seen: dict[str, list[int]] = {}
        labels = correct = 0
        for truth, predicted in pairs:
            hits = seen.setdefault(truth, [0, 0])
            hits[0] += truth == predicted
            hits[1] += 1
            correct += truth == predicted
            labels += 1
        return cls(labels=labels, correct=correct,
                   recall={name: hit / total for name, (hit, total) in sorted(seen.items())},
                   logged=logged, answered=answered)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labels if self.labels else None

    @property
    def share(self) -> float | None:
        return self.answered / self.logged if self.logged else None
