"""Near-duplicate images: what keeps splits apart and what the leakage rule counts.

Two images are near-duplicates when their perceptual hashes (imagehash's pHash, 64
bits) are within `distance` bits AND their pixels differ by at most `pixel_diff` on
average (0..1 scale). The hash alone is too coarse for small images: on Fashion-MNIST,
28% of test images have a training image within 4 bits, almost all of them merely the
same kind of garment, while 0.22% also match pixel for pixel within 2%. The hash finds
candidates fast (a 64-bit XOR per pair); the pixel check decides.
"""

from __future__ import annotations

import imagehash
import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

CHUNK = 1024  # rows per block of the pairwise hash comparison (CHUNK x n uint64)


def phashes(pixels: np.ndarray) -> np.ndarray:
    """pHash of each uint8 [n, h, w, c] image, as uint64."""
    out = np.empty(len(pixels), dtype=np.uint64)
    for i, image in enumerate(pixels):
        picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        bits = imagehash.phash(picture).hash.ravel()
        out[i] = np.uint64(int.from_bytes(np.packbits(bits).tobytes(), "big"))
    return out


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute pixel difference of image pairs (a[i], b[i]), on 0..1."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return diff.reshape(len(a), -1).mean(axis=1) / 255.0


def matches(queries: np.ndarray, query_hashes: np.ndarray, pool: np.ndarray,
            pool_hashes: np.ndarray, distance: int, pixel_diff: float,
            upper_only: bool = False):
    """Yield (query row, pool row, pixel difference) for every near-duplicate pair;
    `upper_only` (queries are the pool) keeps each pair once, query row < pool row."""
    for start in range(0, len(queries), CHUNK):
        block = query_hashes[start:start + CHUNK]
        close = np.bitwise_count(block[:, None] ^ pool_hashes[None, :]) <= distance
        q, p = np.nonzero(close)
        q = q + start
        if upper_only:
            keep = q < p
            q, p = q[keep], p[keep]
        if len(q) == 0:
            continue
        diff = mean_abs_diff(queries[q], pool[p])
        near = diff <= pixel_diff
        yield from zip(q[near].tolist(), p[near].tolist(), diff[near].tolist(), strict=True)


def clusters(pixels: np.ndarray, hashes: np.ndarray, distance: int, pixel_diff: float
             ) -> list[str]:
    """Each image's near-duplicate cluster (connected pairs), as a group name: a
    cluster's images go to one split together."""
    pairs = list(matches(pixels, hashes, pixels, hashes, distance, pixel_diff,
                         upper_only=True))
    n = len(pixels)
    rows = np.array([a for a, _, _ in pairs], dtype=np.int64)
    cols = np.array([b for _, b, _ in pairs], dtype=np.int64)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return [f"near:{label}" for label in labels.tolist()]


def leakage(held_out: np.ndarray, held_hashes: np.ndarray, train: np.ndarray,
            train_hashes: np.ndarray, distance: int, pixel_diff: float) -> dict:
    """How many held-out images equal or near-duplicate a training image, with the
    closest example pair (held-out row, training row)."""
    closest: dict[int, tuple[float, int]] = {}
    for q, p, diff in matches(held_out, held_hashes, train, train_hashes, distance,
                              pixel_diff):
        if q not in closest or diff < closest[q][0]:
            closest[q] = (diff, p)
    equal = sum(1 for diff, _ in closest.values() if diff == 0.0)
    rows = len(held_out)
    found = {"rows": rows, "leaked": len(closest), "share": len(closest) / max(rows, 1),
             "equal": equal, "near_duplicate": len(closest) - equal, "example": None}
    if closest:
        row = min(closest, key=lambda q: (closest[q][0], q))
        diff, train_row = closest[row]
        found["example"] = {"row": row, "train_row": train_row,
                            "pixel_diff": round(diff, 6),
                            "hash_distance": int(np.bitwise_count(
                                held_hashes[row] ^ train_hashes[train_row]))}
    return found
