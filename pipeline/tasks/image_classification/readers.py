"""Reading image data sets from local files: IDX (MNIST, Fashion-MNIST), CIFAR-10's
python batches, and a folder per class (or a CSV manifest) of image files.

Every reader checks what it reads against what the format promises and raises
`CollectError` naming the file (and the item or line) on the first thing that is off.
Pixels come out as uint8 [N, H, W] (IDX) or [N, H, W, C], labels as int64 [N].
"""

from __future__ import annotations

import csv
import gzip
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np

from pipeline.data.readers import CollectError
from serving.bundle.images import ImageError, ImageSpec

IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801  # unsigned bytes; 3 and 1 dimensions
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST, CIFAR_META = "test_batch", "batches.meta"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp")


# ---------------------------------------------------------------- IDX


def read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when they are gzip (told by content, not by name)."""
    if not path.is_file():
        raise CollectError(f"{path}: file not found")
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        raise CollectError(f"{path}: a damaged or truncated gzip file ({err})") from None


def read_idx_array(path: Path, magic: int) -> np.ndarray:
    data = read_bytes(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    found = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else None
    if found != magic:
        shown = "none" if found is None else f"0x{found:08x}"
        raise CollectError(f"{path}: not an IDX {'images' if ndim == 3 else 'labels'} file "
                           f"(magic {shown}, expected 0x{magic:08x})")
    if len(data) < header:
        raise CollectError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise CollectError(f"{path}: {len(data) - header} bytes of data, the header "
                           f"({' x '.join(map(str, shape))}) says {expected}; truncated?")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """IDX images (uint8 [N, rows, cols]) and their labels (int64 [N]), plain or .gz."""
    pixels = read_idx_array(Path(images), IDX_IMAGES)
    classes = read_idx_array(Path(labels), IDX_LABELS).astype(np.int64)
    if len(pixels) != len(classes):
        raise CollectError(f"{images}: {len(pixels)} images, but {labels} has "
                           f"{len(classes)} labels")
    return pixels.copy(), classes  # frombuffer's array is read-only


# ---------------------------------------------------------------- CIFAR-10


class CifarUnpickler(pickle.Unpickler):
    """Builds only what CIFAR's batches hold: numpy arrays and plain containers.

    A pickle can call anything it names; refusing every other name means a hostile
    batch file cannot run code.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        # Protocol 2 from Python 3 writes bytes as _codecs.encode(text, "latin1").
        ("_codecs", "encode"),
        *(("builtins", name) for name in ("list", "dict", "tuple", "set", "frozenset",
                                           "bytearray", "bytes", "str", "int", "float")),
    }

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise CollectError(f"{self.path}: refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def load_batch(path: Path) -> dict:
    if not path.is_file():
        raise CollectError(f"{path}: missing (CIFAR-10's python version has "
                           f"{', '.join(CIFAR_TRAIN)}, {CIFAR_TEST} and {CIFAR_META})")
    with path.open("rb") as file:
        try:
            batch = CifarUnpickler(file, path).load()
        except CollectError:
            raise
        except Exception as err:  # UnpicklingError, EOFError, ... of a damaged file
            raise CollectError(f"{path}: not a CIFAR-10 batch ({err})") from None
    if not isinstance(batch, dict):
        raise CollectError(f"{path}: not a CIFAR-10 batch (a {type(batch).__name__})")
    return batch


def cifar_batch(path: Path, classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = load_batch(path)
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        shape = list(data.shape) if isinstance(data, np.ndarray) else type(data).__name__
        raise CollectError(f"{path}: data of the wrong shape ({shape}, expected uint8 [N, 3072])")
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (len(data),):
        raise CollectError(f"{path}: {len(data)} images but {labels.size} labels")
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        raise CollectError(f"{path}, item {bad[0]}: label {labels[bad[0]]} is out of range "
                           f"of the {classes} label names")
    # Channel-planar rows (1024 red, 1024 green, 1024 blue) -> [N, 32, 32, 3].
    pixels = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(pixels), labels


def read_cifar(directory: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """CIFAR-10's python version: {"train": (pixels, labels), "test": ...}, label names."""
    directory = Path(directory)
    meta = load_batch(directory / CIFAR_META)
    names = meta.get(b"label_names")
    if not isinstance(names, list) or not names:
        raise CollectError(f"{directory / CIFAR_META}: no label_names")
    label_names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    train = [cifar_batch(directory / name, len(label_names)) for name in CIFAR_TRAIN]
    splits = {
        "train": (np.concatenate([p for p, _ in train]), np.concatenate([y for _, y in train])),
        "test": cifar_batch(directory / CIFAR_TEST, len(label_names)),
    }
    return splits, label_names


# ---------------------------------------------------------------- image folders


def is_image(path: Path, root: Path) -> bool:
    hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
    return path.is_file() and not hidden and path.suffix.lower() in IMAGE_SUFFIXES


def folder_items(root: Path) -> list[tuple[str, str, str]]:
    """(file, label, group) for root/<label>/**/<file>; the group is the file."""
    items = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name[0] != "."):
        files = [p for p in folder.rglob("*") if is_image(p, root)]
        if not files:
            raise CollectError(f"{folder}: a class folder with no images in it")
        items += [(f.relative_to(root).as_posix(), folder.name, "") for f in files]
    return items


def manifest_items(root: Path, manifest: Path) -> list[tuple[str, str, str]]:
    """(file, label, group) for each row of a `file,label[,group]` CSV."""
    if not manifest.is_file():
        raise CollectError(f"{manifest}: file not found")
    with manifest.open(encoding="utf-8", newline="") as text:
        reader = csv.DictReader(text)
        missing = {"file", "label"} - set(reader.fieldnames or [])
        if missing:
            raise CollectError(f"{manifest}: no {' or '.join(sorted(missing))} column "
                               "(expected a header file,label[,group])")
        items, seen = [], {}
        for row in reader:
            where = f"{manifest}, line {reader.line_num}"
            file, label = (row["file"] or "").strip(), (row["label"] or "").strip()
            if not file or not label:
                raise CollectError(f"{where}: empty file or label")
            if not (root / file).is_file():
                raise CollectError(f"{where}: {file} not found under {root}")
            if file in seen:
                raise CollectError(f"{where}: {file} listed again (first on line {seen[file]})")
            seen[file] = reader.line_num
            items.append((file, label, (row.get("group") or "").strip()))
    return items


def read_folder(
    root: Path, spec: ImageSpec, manifest: Path | None = None,
    label_names: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str], list[str], list[str]]:
    """Images of a folder per class, or those a manifest lists, decoded at the spec's size.

    Returns pixels uint8 [N, H, W, C], labels int64 [N], groups (the manifest's, else
    the file), label names and files (relative to root), sorted by file.
    """
    root = Path(root)
    if not root.is_dir():
        raise CollectError(f"{root}: no such directory")
    items = manifest_items(root, Path(manifest)) if manifest else folder_items(root)
    if not items:
        raise CollectError(f"no images under {root}")
    items.sort()
    names = list(label_names) if label_names is not None else sorted({i[1] for i in items})
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({label for _, label, _ in items} - set(index))
    if unknown:
        raise CollectError(f"{manifest or root}: labels {', '.join(unknown)} are not among "
                           f"the known ones ({', '.join(names)})")
    pixels = np.empty((len(items), spec.height, spec.width, spec.channels), dtype=np.uint8)
    for row, (file, _, _) in enumerate(items):
        try:
            pixels[row] = spec.decode((root / file).read_bytes(), item=file)
        except ImageError as err:
            raise CollectError(f"{root / file}: {err.reason}") from None
    labels = np.array([index[label] for _, label, _ in items], dtype=np.int64)
    groups = [group or file for file, _, group in items]
    return pixels, labels, groups, names, [file for file, _, _ in items]
