"""Production feedback for images: the labelled thumbnails of the prediction log.

The service keeps an image's pixels only under `TEXTOPS_PREDICTION_LOG_IMAGES=thumbnail`
(serving/api/images.py): the image as the model took it, a PNG data URI. Labelled
through `/feedback` and exported (`make retrain`, pipeline/data/feedback.py), collect
reads them back as the `feedback` split (`read_feedback_images`) and preprocess merges
them into training but for a slice held out as `feedback_test` (`merge_feedback`), by
text's rule (pipeline/data/feedback_split.py) with near-duplicates for containment:
- a row that equals or near-duplicates a validation or test image would leak: dropped;
- a row that near-duplicates a training image cannot be tested fairly: it trains;
- the others form groups (a request's images, joined with their near-duplicates), and
  a hash of each group's earliest request id holds out about `feedback_holdout` of
  them, so that as the snapshot grows every earlier group stays on its side.
Rows logged as a hash only (the default policy) carry no pixels: counted and skipped.
"""

from __future__ import annotations

import base64
import binascii
import logging
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, Value, concatenate_datasets
from omegaconf import DictConfig
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.data.feedback_split import held_out_by_hash
from pipeline.data.readers import CollectError, read_feedback_snapshot
from pipeline.data.splits import FEEDBACK_TEST, column
from pipeline.tasks.image_classification import duplicates
from pipeline.tasks.image_classification.arrays import pixels, to_dataset
from serving.bundle.images import THUMBNAIL_PREFIX, ImageError, ImageSpec

log = logging.getLogger(__name__)


def read_feedback_images(config: dict | None, spec: ImageSpec, names: list[str],
                         root: Path) -> tuple[Dataset | None, dict | None]:
    """The `feedback` split (None when no row holds an image) and what was read (None
    when there is no snapshot). A bad thumbnail or an unknown label names its line."""
    feedback = read_feedback_snapshot(config, root)
    if feedback is None:
        return None, None
    kept, images = [], []
    for i, (key, label, row) in enumerate(zip(feedback.texts, feedback.labels,
                                              feedback.rows, strict=True)):
        if not key.startswith(THUMBNAIL_PREFIX):
            continue
        where = f"{feedback.origin}, line {row}"
        if label not in names:
            raise CollectError(f"{where}: unknown label {label!r} (the data's classes: "
                               f"{', '.join(names)})")
        try:
            data = base64.b64decode(key[len(THUMBNAIL_PREFIX):].split("#", 1)[0],
                                    validate=True)
            images.append(spec.decode(data, where))
        except binascii.Error:
            raise CollectError(f"{where}: the thumbnail is not valid base64") from None
        except ImageError as err:
            raise CollectError(str(err)) from None
        kept.append(i)
    report = {"origin": feedback.origin, "rows": len(kept), "sha256": feedback.sha256,
              "relabelled_dropped": feedback.repeats,
              "hash_only_skipped": len(feedback.texts) - len(kept)}
    if report["hash_only_skipped"]:
        log.warning("%s: %d labelled images were logged as a hash only, so they cannot "
                    "be trained on (TEXTOPS_PREDICTION_LOG_IMAGES=thumbnail keeps them)",
                    feedback.origin, report["hash_only_skipped"])
    if not kept:
        return None, report
    split = to_dataset(np.stack(images), np.array([names.index(feedback.labels[i])
                                                   for i in kept]),
                       [""] * len(kept), np.array([feedback.rows[i] for i in kept]), names)
    split = split.add_column("request_id", [feedback.request_ids[i] for i in kept],
                             feature=Value("string"))
    return split.add_column("position", [feedback.positions[i] for i in kept],
                            feature=Value("int64")), report


def near(queries: np.ndarray, query_hashes: np.ndarray, pool: np.ndarray,
         pool_hashes: np.ndarray, cfg: DictConfig) -> set[int]:
    """Rows of `queries` that equal or near-duplicate some image of `pool`."""
    return {q for q, _, _ in duplicates.matches(queries, query_hashes, pool, pool_hashes,
                                                cfg.near_duplicate_distance,
                                                cfg.near_duplicate_pixel_diff)}


def feedback_groups(images: np.ndarray, hashes: np.ndarray, request_ids: list[str],
                    cfg: DictConfig) -> np.ndarray:
    """A group per row: a request's images and their near-duplicates go together."""
    pairs = [(a, b) for a, b, _ in duplicates.matches(
        images, hashes, images, hashes, cfg.near_duplicate_distance,
        cfg.near_duplicate_pixel_diff, upper_only=True)]
    first_of: dict[str, int] = {}
    pairs += [(first_of.setdefault(r, i), i) for i, r in enumerate(request_ids)]
    n = len(images)
    graph = coo_matrix((np.ones(len(pairs)), ([a for a, _ in pairs], [b for _, b in pairs])),
                       shape=(n, n))
    return connected_components(graph, directed=False)[1]


def merge_feedback(feedback: Dataset, splits: DatasetDict, arrays: dict[str, np.ndarray],
                   hashes: dict[str, np.ndarray], cfg: DictConfig, seed: int
                   ) -> tuple[DatasetDict, dict]:
    """`splits` with the feedback's rows added to train and a `feedback_test` split of
    the held-out ones; base training rows get an empty `request_id`, feedback rows the
    id of the answer they label. `arrays` and `hashes` hold the base splits' pixels
    and pHashes."""
    images = pixels(feedback)
    found = duplicates.phashes(images)
    leaking = set()
    for name in ("val", "test"):
        leaking |= near(images, found, arrays[name], hashes[name], cfg)
    fresh = [i for i in range(len(images)) if i not in leaking]
    in_train = {fresh[j] for j in near(images[fresh], found[fresh], arrays["train"],
                                       hashes["train"], cfg)}
    request_ids = column(feedback, "request_id")
    groups = feedback_groups(images[fresh], found[fresh], [request_ids[i] for i in fresh],
                             cfg)
    seen = {g for g, i in zip(groups, fresh, strict=True) if i in in_train}
    earliest: dict[int, str] = {}
    for g, i in zip(groups, fresh, strict=True):
        earliest[g] = min(earliest.get(g, request_ids[i]), request_ids[i])
    held_groups = {g for g, request in earliest.items() if g not in seen
                   and held_out_by_hash(request, cfg.feedback_holdout, seed)}
    held = [i for g, i in zip(groups, fresh, strict=True) if g in held_groups]
    train = [i for g, i in zip(groups, fresh, strict=True) if g not in held_groups]

    base = splits["train"].add_column("request_id", [""] * splits["train"].num_rows,
                                      feature=Value("string"))
    added = feedback.select(train).select_columns(base.column_names).remove_columns("group")
    added = added.add_column("group", [f"feedback:{r}" for r in column(added, "request_id")],
                             feature=Value("string"))
    merged = DatasetDict(splits)
    merged["train"] = concatenate_datasets([base, added.cast(base.features)]) if train \
        else base
    if held:
        merged[FEEDBACK_TEST] = feedback.select(held)
    report = {"rows_in": len(images), "near_duplicate_of_val_or_test": len(leaking),
              "groups": len(set(groups.tolist())), "groups_near_training_images": len(seen),
              "held_out": len(held), "trained": len(train)}
    return merged, report
