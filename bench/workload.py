"""What the serving benchmark sends, per kind of bundle: texts or images.

bench/bench_serving.py measures whatever the bundle takes (`bundle.task.items`) and
leaves to a workload everything that depends on the kind of item:

- the items, as a client sends them: SST-2 dev texts; the first 2,000 Fashion-MNIST
  test images, each encoded as a PNG file (what a client uploads) and in base64 (how
  JSON carries a file);
- the request bodies for each kind of server: `{"texts"|"images": [...]}` for our
  service, and `mlflow models serve`'s `dataframe_split` (a `text` column, or an
  `image` column of base64 strings, which MLflow decodes for the pyfunc's binary
  column);
- the in-process limit's work for one batch: what the service does with it, minus
  HTTP (texts: tokenize, length-grouped ONNX calls; images: base64 and PNG decoding,
  then one `infer` call);
- the bundle's own answers, which a server's are checked against;
- the words and figures of the report: result name, title, targets, units.

    workload = for_bundle(bundle)   # TextWorkload or ImageWorkload, items loaded
"""

from __future__ import annotations

import base64
import gzip
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from serving.bundle import Bundle, softmax
from serving.engine.inference import infer, length_groups

ROOT = Path(__file__).resolve().parent.parent
FASHION_DATA = ROOT / "conf/data/fashion_mnist.yaml"  # its test split, its class names
IMAGES = 2000  # test images sent: enough variety, cheap to encode


def chunks(items: list, size: int) -> list[list]:
    """Consecutive runs of `size` items; a last, short run is dropped."""
    return [items[i : i + size] for i in range(0, len(items) - size + 1, size)]


class Workload:
    """The kind of item a bundle takes, and what the benchmark does with it."""

    noun = plural = key = ""  # "text", "texts", and the request's JSON key
    rate = ""  # the results' key for items per second
    mlflow_column = ""  # the pyfunc's input column
    result = title = about = ""  # the published page
    targets: dict[str, float] = {}  # "2/1 (<n> <items>)" -> ratio at concurrency 32
    p99_target_ms: float | None = None  # at 1 item per request and concurrency 32
    headline = 16  # items per request of the plot and the README's figure
    naive = False  # bench/naive_server.py serves it

    def __init__(self, items: list):
        self.items = items

    def count(self, n: int) -> str:
        """"1 text", "16 texts"."""
        return f"{n} {self.noun if n == 1 else self.plural}"

    def bodies(self, kind: str, items: list, per_request: int) -> list[bytes]:
        """Request bodies of `per_request` items for a server of `kind` ("mlflow", or
        any other: our service's and the naive server's JSON)."""
        if kind == "mlflow":
            return [json.dumps({"dataframe_split": {"columns": [self.mlflow_column],
                                                    "data": [[item] for item in chunk]}}
                               ).encode() for chunk in chunks(items, per_request)]
        return [json.dumps({self.key: chunk}).encode() for chunk in chunks(items, per_request)]

    def batch(self, bundle: Bundle, items: list) -> None:
        """The in-process limit's work for one batch of `items`."""
        raise NotImplementedError

    def expected(self, bundle: Bundle, items: list) -> np.ndarray:
        """The bundle's probabilities for `items` as sent."""
        raise NotImplementedError


class TextWorkload(Workload):
    noun, plural, key, rate, mlflow_column = "text", "texts", "texts", "texts_per_s", "text"
    result, title = "serving", "Serving throughput against the alternatives"
    # Issue 14's targets: at concurrency 32, the service at 0.7x the in-process limit
    # with one text per request (goal 0.85x) and 0.95x with 16.
    targets = {"2/1 (1 text)": 0.7, "2/1 (16 texts)": 0.95}
    p99_target_ms = 60
    naive = True
    about = """SST-2 dev texts over loopback, one and sixteen texts per request, at several
concurrencies (`per request x concurrency`), against the same int8 model served by
the alternatives a user would pick (bench/peers/) and an in-process limit (the ONNX model
called without HTTP). Each point is measured in every setting in order, then in reverse
order, so that a drift of the machine's speed weighs on all alike; only the server under
load runs. The HTTP floor is uvicorn as the service runs it with a
bare ASGI app answering a fixed body (bench/http_floor.py; the service's /predict is a
plain ASGI handler too): what HTTP alone allows beside this load generator, so the
service's share of it is the cost of its own work per request.
Run again: `python bench/bench_serving.py` (`make bench`)."""

    @classmethod
    def load(cls) -> TextWorkload:
        return cls(dev_texts())

    def batch(self, bundle: Bundle, items: list) -> None:
        encoded = bundle.encode(items)
        lengths = [len(ids) for ids in encoded]
        for group in length_groups(lengths):
            softmax(bundle.run([encoded[i] for i in group]))

    def expected(self, bundle: Bundle, items: list) -> np.ndarray:
        return bundle.predict_proba(items)


class ImageWorkload(Workload):
    noun, plural, key, rate, mlflow_column = "image", "images", "images", "images_per_s", "image"
    result, title = "serving_images", "Image serving throughput against the alternatives"
    targets = {"2/1 (1 image)": 0.7}
    headline = 1
    about = """The first 2,000 Fashion-MNIST test images, each sent as a PNG file in base64
(`{"images": [...]}`), over loopback, one and sixteen images per request, at several
concurrencies (`per request x concurrency`), against the same int8 model served by the
alternatives a user would pick (bench/peers/) and an in-process limit (the same work
without HTTP: base64 and PNG decoding, then the ONNX model). Each point is measured in
every setting in order, then in reverse order, so that a drift of the machine's speed
weighs on all alike; only the server under load runs. The naive baseline serves the text
model only and is left out. The HTTP floor is uvicorn as the service runs it with a
bare ASGI app answering a fixed body (bench/http_floor.py; the service's /predict is a
plain ASGI handler too): what HTTP alone allows beside this load generator, so the
service's share of it is the cost of its own work per request.
Run again: `python bench/bench_serving.py --bundle <image bundle>`."""

    @classmethod
    def load(cls, count: int = IMAGES) -> ImageWorkload:
        files, _ = fashion_mnist_test(count)
        return cls([base64.b64encode(data).decode("ascii") for data in files])

    @staticmethod
    def files(items: list[str]) -> list[bytes]:
        return [base64.b64decode(item, validate=True) for item in items]

    def batch(self, bundle: Bundle, items: list) -> None:
        infer(bundle, list(bundle.inputs.pixels(self.files(items))))

    def expected(self, bundle: Bundle, items: list) -> np.ndarray:
        return bundle.predict_proba(self.files(items))


def sst2_dev() -> tuple[list[str], list[str]]:
    """SST-2's dev texts and their labels' names (the data set's 0/1)."""
    with gzip.open(ROOT / "data/external/sst2/dev.tsv.gz", "rt", encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return [text.strip() for text, _ in rows], [("negative", "positive")[int(y)]
                                                for _, y in rows]


def dev_texts() -> list[str]:
    """SST-2's dev texts (the other benchmarks send them too)."""
    return sst2_dev()[0]


def png(pixels: np.ndarray) -> bytes:
    """One uint8 [h, w] or [h, w, c] image as a PNG file, as a client uploads it."""
    plane = pixels[:, :, 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(plane)).save(buffer, format="PNG")
    return buffer.getvalue()


def fashion_mnist_test(count: int | None = None) -> tuple[list[bytes], list[str]]:
    """The first `count` (all: None) of Fashion-MNIST's test images as PNG files, and
    their labels' names: an IDX label numbers the data config's `label_names`, as
    collect reads it (pipeline/tasks/image_classification/collect.py)."""
    from omegaconf import OmegaConf

    from pipeline.tasks.image_classification.readers import read_idx

    data = OmegaConf.load(FASHION_DATA)
    pixels, labels = read_idx(ROOT / data.splits.test.images, ROOT / data.splits.test.labels)
    names = list(data.label_names)
    return [png(image) for image in pixels[:count]], [names[y] for y in labels[:count]]


def bodies_for(kind: str, texts: list[str], per_request: int) -> list[bytes]:
    """Text request bodies for a server of `kind` (see `Workload.bodies`)."""
    return TextWorkload(texts).bodies(kind, texts, per_request)


def for_bundle(bundle: Bundle) -> Workload:
    """The workload for what `bundle` takes, its items loaded."""
    return ImageWorkload.load() if bundle.task.items == "images" else TextWorkload.load()
