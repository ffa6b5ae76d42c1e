"""What turns a request's items into the model's input tensors, one class per task.

- `TextInputs`: texts -> token ids with the bundle's `tokenizer.json` (normaliser and
  personal-data masking inside), padded per batch to its longest row;
  `in_order` batches by length so that short texts do not pay for long ones' padding.
- `ImageInputs`: encoded files (PNG, JPEG, ...) or uint8 pixel arrays -> float32
  [channels, height, width] with the bundle's `image_spec.json`
  (serving/bundle/images.py), stacked per batch.

Both load only from the bundle directory and raise `ValueError` naming the file when
it cannot be used; Bundle.load turns that into a BundleError.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from serving.bundle.images import ImageSpec
from serving.bundle.tensors import in_length_order, pad


class TextInputs:
    """Texts through tokenizer.json."""

    def __init__(self, path: Path, meta: dict):
        tokenizer_file = path / "tokenizer.json"
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # tokenizers raises a bare Exception
            raise ValueError(f"{tokenizer_file}: cannot load ({err})") from None
        self.pad_id = meta["pad_id"]
        # bundles whose tokenizer.json has this digest make the same ids of a text
        self.digest = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids, normalised, masked and truncated exactly as in training."""
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def feeds(self, batch: list[list[int]]) -> dict[str, np.ndarray]:
        input_ids, attention_mask = pad(batch, self.pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def in_order(self, encoded: list, batch_size: int, width: int,
                 run: Callable[[list], np.ndarray]) -> np.ndarray:
        return in_length_order(encoded, batch_size, width, run)


class ImageInputs:
    """Images through image_spec.json."""

    def __init__(self, path: Path, meta: dict):
        spec_file = path / "image_spec.json"
        try:
            self.spec = ImageSpec.from_dict(json.loads(spec_file.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"{spec_file}: cannot load ({err})") from None

    def pixels(self, images: list, first: int = 0) -> np.ndarray:
        """uint8 [n, height, width, channels]: files decoded, files already opened
        (`ImageSpec.open`) loaded, arrays converted, by the spec's policy; ImageError
        names the item (`images[i]`) that is not an image."""
        out = np.empty((len(images), self.spec.height, self.spec.width, self.spec.channels),
                       dtype=np.uint8)
        for i, image in enumerate(images):
            item = f"images[{first + i}]"
            if isinstance(image, bytes | bytearray):
                out[i] = self.spec.decode(image, item)
            elif isinstance(image, Image.Image):
                out[i] = self.spec.load(image, item)
            else:
                out[i] = self.spec.from_array(np.asarray(image), item)
        return out

    def encode(self, images: list) -> list[np.ndarray]:
        """Each image as the model takes it: float32 [channels, height, width]."""
        return list(self.spec.normalise(self.pixels(images)))

    def feeds(self, batch: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {"pixels": np.stack(batch)}

    def in_order(self, encoded: list, batch_size: int, width: int,
                 run: Callable[[list], np.ndarray]) -> np.ndarray:
        out = np.zeros((len(encoded), width), dtype=np.float32)
        for start in range(0, len(encoded), batch_size):
            out[start:start + batch_size] = run(encoded[start:start + batch_size])
        return out
