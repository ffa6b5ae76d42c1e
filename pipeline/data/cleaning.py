"""Cleaning a split before it is split or merged: empty texts, duplicates,
contradictions and rows that repeat a held-out split are dropped and counted."""

from __future__ import annotations

from collections import Counter

from datasets import Dataset

from pipeline.data.splits import column


def clean_split(ds: Dataset, normalize, exclude: set[str] = frozenset()
                ) -> tuple[Dataset, list[str], dict]:
    """Drop empty texts, duplicates and contradictions; count what was dropped.
    Returns the kept rows, their normalised texts and the counts.

    - empty: nothing left after normalisation;
    - conflicting_labels: the same normalised text with different labels (all dropped,
      since no label can be trusted);
    - exact_duplicates / normalized_duplicates: a repeat of a kept row, before or after
      normalisation (the first is kept);
    - overlap_with_held_out: texts also in a test or validation split that the source
      provides, dropped so that held-out scores are not inflated by memorised rows.
    """
    texts, labels = column(ds, "text"), column(ds, "label")
    normalized = [normalize(t) for t in texts]
    labels_of: dict[str, set[int]] = {}
    for text, label in zip(normalized, labels, strict=True):
        labels_of.setdefault(text, set()).add(label)
    counts = Counter()
    seen_raw, seen_norm, keep = set(), set(), []
    for i, (raw, norm) in enumerate(zip(texts, normalized, strict=True)):
        if not norm:
            counts["empty"] += 1
        elif len(labels_of[norm]) > 1:
            counts["conflicting_labels"] += 1
        elif norm in exclude:
            counts["overlap_with_held_out"] += 1
        elif raw in seen_raw:
            counts["exact_duplicates"] += 1
        elif norm in seen_norm:
            counts["normalized_duplicates"] += 1
        else:
            keep.append(i)
        seen_raw.add(raw)
        seen_norm.add(norm)
    kinds = ["empty", "exact_duplicates", "normalized_duplicates", "conflicting_labels",
             "overlap_with_held_out"]
    report = {"rows_in": ds.num_rows, **{k: counts[k] for k in kinds}, "rows_out": len(keep)}
    return ds.select(keep), [normalized[i] for i in keep], report
