"""Image data set readers: IDX, CIFAR-10's python batches and class folders, each read
exactly, and every bad input (or hostile pickle) refused naming the file."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.readers import CollectError
from pipeline.tasks.image_classification.readers import read_cifar, read_folder, read_idx
from serving.bundle.images import ImageSpec

FASHION = Path("/work/shared/data/fashion_mnist")
RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- IDX


def idx_images(pixels: np.ndarray, magic: int = 0x00000803) -> bytes:
    return struct.pack(">IIII", magic, *pixels.shape) + pixels.tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 0x00000801, len(labels)) + labels.astype(np.uint8).tobytes()


def write_idx(tmp_path, pixels, labels, gz=False):
    suffix = ".gz" if gz else ""
    pack = gzip.compress if gz else bytes
    images, classes = tmp_path / f"images{suffix}", tmp_path / f"labels{suffix}"
    images.write_bytes(pack(idx_images(pixels)))
    classes.write_bytes(pack(idx_labels(labels)))
    return images, classes


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reads_plain_and_gzip(tmp_path, gz):
    pixels = RNG.integers(0, 256, (3, 4, 5), dtype=np.uint8)
    labels = np.array([2, 0, 9])
    got, classes = read_idx(*write_idx(tmp_path, pixels, labels, gz))
    np.testing.assert_array_equal(got, pixels)
    assert classes.dtype == np.int64 and classes.tolist() == [2, 0, 9]
    got[0, 0, 0] = 1  # the caller may write to what it gets


def test_idx_wrong_magic_is_named(tmp_path):
    images, labels = write_idx(tmp_path, np.zeros((1, 2, 2), np.uint8), np.zeros(1))
    images.write_bytes(idx_images(np.zeros((1, 2, 2), np.uint8), magic=0x00000801))
    with pytest.raises(CollectError, match=rf"^{images}: not an IDX images file "
                                           r"\(magic 0x00000801, expected 0x00000803\)"):
        read_idx(images, labels)
    labels.write_bytes(idx_images(np.zeros((1, 2, 2), np.uint8)))
    images.write_bytes(idx_images(np.zeros((1, 2, 2), np.uint8)))
    with pytest.raises(CollectError, match=rf"^{labels}: not an IDX labels file"):
        read_idx(images, labels)


def test_a_truncated_idx_file_is_named(tmp_path):
    images, labels = write_idx(tmp_path, np.zeros((2, 3, 3), np.uint8), np.zeros(2))
    images.write_bytes(images.read_bytes()[:-4])
    with pytest.raises(CollectError, match=rf"^{images}: 14 bytes of data, the header "
                                           r"\(2 x 3 x 3\) says 18; truncated\?"):
        read_idx(images, labels)


def test_a_truncated_gzip_is_named(tmp_path):
    images, labels = write_idx(tmp_path, RNG.integers(0, 256, (9, 9, 9), np.uint8),
                               np.zeros(9), gz=True)
    images.write_bytes(images.read_bytes()[:-20])
    with pytest.raises(CollectError, match=rf"^{images}: a damaged or truncated gzip"):
        read_idx(images, labels)


def test_idx_counts_must_agree(tmp_path):
    images, labels = write_idx(tmp_path, np.zeros((3, 2, 2), np.uint8), np.zeros(2))
    with pytest.raises(CollectError, match=r"3 images, but .*labels has 2 labels"):
        read_idx(images, labels)


@pytest.mark.skipif(not (FASHION / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST is not under {FASHION}")
def test_fashion_mnist_test_split():
    pixels, labels = read_idx(FASHION / "t10k-images-idx3-ubyte.gz",
                              FASHION / "t10k-labels-idx1-ubyte.gz")
    assert pixels.shape == (10000, 28, 28) and pixels.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10


# ---------------------------------------------------------------- CIFAR-10


NAMES = [b"airplane", b"automobile", b"bird"]


def dump(path: Path, batch) -> None:
    path.write_bytes(pickle.dumps(batch, protocol=2))


def write_cifar(root: Path, per_batch: int = 4) -> Path:
    """CIFAR-10's python layout in miniature; image i of batch b has red value 10 * b + i."""
    root.mkdir(exist_ok=True)
    dump(root / "batches.meta", {b"label_names": NAMES, b"num_vis": 3072})
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = np.zeros((per_batch, 3072), np.uint8)
        data[:, :1024] = (10 * b + np.arange(per_batch))[:, None]  # the red plane
        labels = [(b + i) % len(NAMES) for i in range(per_batch)]
        dump(root / name, {b"batch_label": b"batch", b"data": data, b"labels": labels,
                           b"filenames": [b"x.png"] * per_batch})
    return root


def test_cifar_reads_splits_names_and_labels(tmp_path):
    splits, names = read_cifar(write_cifar(tmp_path / "cifar"))
    assert names == ["airplane", "automobile", "bird"]
    train_pixels, train_labels = splits["train"]
    test_pixels, test_labels = splits["test"]
    assert train_pixels.shape == (20, 32, 32, 3) and train_pixels.dtype == np.uint8
    assert test_pixels.shape == (4, 32, 32, 3)
    assert train_labels.dtype == np.int64
    assert train_labels[:5].tolist() == [0, 1, 2, 0, 1]  # batch 1, then batch 2
    assert train_pixels[4, 0, 0, 0] == 10 and test_pixels[1, 0, 0, 0] == 51


def test_cifar_planes_become_channels(tmp_path):
    root = write_cifar(tmp_path / "cifar")
    data = np.zeros((1, 3072), np.uint8)
    data[0, 0] = 255  # red plane, pixel (0, 0)
    data[0, 1024 + 33] = 255  # green plane, pixel (1, 1)
    dump(root / "test_batch", {b"data": data, b"labels": [0]})
    pixels = read_cifar(root)[0]["test"][0]
    assert pixels[0, 0, 0].tolist() == [255, 0, 0]
    assert pixels[0, 1, 1].tolist() == [0, 255, 0]


def test_cifar_bad_batches_are_named(tmp_path):
    root = write_cifar(tmp_path / "cifar")
    dump(root / "data_batch_3", {b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4})
    with pytest.raises(CollectError, match=rf"^{root / 'data_batch_3'}: data of the wrong shape"):
        read_cifar(root)
    dump(root / "data_batch_3", {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3})
    with pytest.raises(CollectError, match=r"data_batch_3: 4 images but 3 labels"):
        read_cifar(root)
    dump(root / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 3]})
    with pytest.raises(CollectError, match=r"data_batch_3, item 1: label 3 is out of range"):
        read_cifar(root)
    (root / "data_batch_3").unlink()
    with pytest.raises(CollectError, match=rf"^{root / 'data_batch_3'}: missing"):
        read_cifar(root)


class Hostile:
    """Unpickling this would create a directory: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def test_a_hostile_pickle_is_refused_and_not_run(tmp_path):
    root = write_cifar(tmp_path / "cifar")
    marker = tmp_path / "pwned"
    dump(root / "data_batch_1", {b"data": Hostile(marker), b"labels": []})
    with pytest.raises(CollectError, match=rf"^{root / 'data_batch_1'}: refusing to unpickle "
                                           r"(os|posix)\.makedirs$"):
        read_cifar(root)
    assert not marker.exists()


# ---------------------------------------------------------------- class folders


def save(path: Path, image: Image.Image, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt)


def class_folders(root: Path) -> Path:
    save(root / "cat/b.png", Image.new("RGBA", (20, 10), (0, 0, 0, 0)))
    save(root / "cat/a.JPG", Image.new("RGB", (8, 8), (250, 0, 0)), "JPEG")
    save(root / "dog/c.png", Image.new("L", (3, 30), 40))
    save(root / "dog/sub/d.gif", Image.new("P", (5, 5)))
    save(root / "dog/.hidden.png", Image.new("L", (5, 5)))
    (root / "dog/notes.txt").write_text("not an image")
    return root


def test_class_folders_of_mixed_images(tmp_path):
    root = class_folders(tmp_path / "images")
    pixels, labels, groups, names, files = read_folder(root, ImageSpec(6, 6, 3))
    assert files == ["cat/a.JPG", "cat/b.png", "dog/c.png", "dog/sub/d.gif"]
    assert names == ["cat", "dog"] and labels.tolist() == [0, 0, 1, 1]
    assert groups == files
    assert pixels.shape == (4, 6, 6, 3) and pixels.dtype == np.uint8
    assert (pixels[1] == 255).all()  # transparent became white
    assert np.abs(pixels[0].astype(int) - [250, 0, 0]).max() <= 6


def test_given_label_names_fix_the_order_and_refuse_strangers(tmp_path):
    root = class_folders(tmp_path / "images")
    _, labels, _, names, _ = read_folder(root, ImageSpec(4, 4, 1), label_names=["dog", "cat"])
    assert names == ["dog", "cat"] and labels.tolist() == [1, 1, 0, 0]
    with pytest.raises(CollectError, match=r"labels dog are not among the known ones "
                                           r"\(cat, bird\)"):
        read_folder(root, ImageSpec(4, 4, 1), label_names=["cat", "bird"])


def write_manifest(root: Path, text: str) -> Path:
    manifest = root / "manifest.csv"
    manifest.write_text(text, encoding="utf-8")
    return manifest


def test_a_manifest_lists_files_labels_and_groups(tmp_path):
    root = class_folders(tmp_path / "images")
    manifest = write_manifest(root, "file,label,group\ndog/c.png,small,p1\n"
                                    "cat/b.png,big,p1\ncat/a.JPG,big,\n")
    pixels, labels, groups, names, files = read_folder(root, ImageSpec(4, 4, 1), manifest)
    assert files == ["cat/a.JPG", "cat/b.png", "dog/c.png"]
    assert names == ["big", "small"] and labels.tolist() == [0, 0, 1]
    assert groups == ["cat/a.JPG", "p1", "p1"]  # no group: the file is its own
    assert pixels.shape == (3, 4, 4, 1)
    with pytest.raises(CollectError, match=r"labels small are not among the known ones"):
        read_folder(root, ImageSpec(4, 4, 1), manifest, label_names=["big"])


def test_a_manifest_row_naming_a_missing_file(tmp_path):
    root = class_folders(tmp_path / "images")
    manifest = write_manifest(root, "file,label\ncat/a.JPG,cat\ncat/zebra.png,cat\n")
    with pytest.raises(CollectError, match=rf"^{manifest}, line 3: cat/zebra.png not found"):
        read_folder(root, ImageSpec(4, 4, 1), manifest)


def test_a_truncated_image_is_named(tmp_path):
    root = class_folders(tmp_path / "images")
    noise = Image.fromarray(RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    (root / "dog/broken.png").write_bytes(buffer.getvalue()[:600])
    with pytest.raises(CollectError, match=rf"^{root / 'dog/broken.png'}: truncated or corrupt"):
        read_folder(root, ImageSpec(4, 4, 1))


def test_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CollectError, match=rf"^no images under {tmp_path / 'empty'}$"):
        read_folder(tmp_path / "empty", ImageSpec(4, 4, 1))
