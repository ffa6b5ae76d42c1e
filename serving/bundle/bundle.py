"""A model bundle: the contract between the pipeline and the service.

A bundle is a directory holding
- `model.onnx` (fp32) and `model.int8.onnx` (statically quantised int8),
- its task's preprocessing (serving/bundle/inputs.py): `tokenizer.json` for text,
  which carries the normalisation and personal-data masking; `image_spec.json` for
  images (size, channels, resize rule, mean and std); `tokenizer.json` for next-word
  prediction too (serving/bundle/decoding.py), whose model is a cached language model
  that a `Decoder` runs rather than a classifier,
- `bundle.json`: its task and the model's signature (serving/bundle/tasks.py), label
  names, version, metrics, gate verdict, lineage and the training data profile (the
  drift reference),
- `MODEL_CARD.md`,
- and, in a copy the registry promoted, `registry.json`: the registry version, the
  MLflow run and the git commit (kept out of bundle.json, which the same training
  must write byte for byte in any clone),
- and, in what the deploy stage registers and promotes, `model.sig`: its signature
  over every other file but registry.json (serving/bundle/signature.py).

Loading needs onnxruntime, tokenizers, Pillow and numpy only: no torch, no pickle, nothing
from `pipeline/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from serving.bundle.decoding import Decoder
from serving.bundle.inputs import ImageInputs, TextInputs
from serving.bundle.next_word_inputs import NextWordInputs
from serving.bundle.tasks import (
    IMAGE_CLASSIFICATION,
    NEXT_WORD,
    TEXT_CLASSIFICATION,
    TaskSpec,
    signature,
    signature_problems,
    task_of,
)

MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
# Where a registered model version keeps its bundle, inside the version's artifacts.
REGISTERED_BUNDLE = Path("artifacts") / "bundle"
REQUIRED_META = ("version", "label_names")  # and the task's own (TaskSpec.meta)
INPUTS = {TEXT_CLASSIFICATION: TextInputs, IMAGE_CLASSIFICATION: ImageInputs,
          NEXT_WORD: NextWordInputs}


class BundleError(RuntimeError):
    """A bundle that cannot be served; the message says which file and why."""


@dataclass
class RuntimeOptions:
    """onnxruntime session settings (see serving/settings.py for their defaults)."""

    intra_op_threads: int = 0  # 0: onnxruntime decides
    inter_op_threads: int = 1
    graph_optimization: str = "all"  # disable | basic | extended | all
    spin_wait: bool = False  # busy-waiting threads cost CPU the event loop needs

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.graph_optimization]
        spin = "1" if self.spin_wait else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        return options


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def read_meta(path: Path) -> dict:
    meta_file = path / "bundle.json"
    if not meta_file.is_file():
        raise BundleError(f"{meta_file}: missing (is {path} a model bundle?)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{meta_file}: not valid JSON ({err})") from None
    try:
        task = task_of(meta)
    except KeyError as err:
        raise BundleError(f"{meta_file}: {err.args[0]}") from None
    missing = [key for key in (*REQUIRED_META, *task.meta) if key not in meta]
    if missing:
        raise BundleError(f"{meta_file}: missing fields {', '.join(missing)}")
    return meta


@dataclass
class Bundle:
    path: Path
    meta: dict
    inputs: TextInputs | ImageInputs | NextWordInputs
    session: ort.InferenceSession
    precision: str
    label_names: list[str] = field(init=False)
    task: TaskSpec = field(init=False)
    # a next-word bundle's batched, cached decoding (None for a classifier): made once,
    # so every request and decoding step on this bundle shares it
    decoder: Decoder | None = field(init=False, default=None)

    def __post_init__(self):
        self.label_names = list(self.meta["label_names"])
        self.task = task_of(self.meta)
        if self.task.name == NEXT_WORD:
            try:
                self.decoder = Decoder(self.session, self.meta, self.inputs)
            except (KeyError, ValueError) as err:
                raise BundleError(f"{self.path / 'bundle.json'}: not a next-word model "
                                  f"this service can run ({err})") from None

    @classmethod
    def load(
        cls, path: str | Path, precision: str = "int8", options: RuntimeOptions | None = None
    ) -> Bundle:
        """Open a bundle directory; BundleError names the file when anything is wrong."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"{path}: no such bundle directory")
        if precision not in MODEL_FILES:
            raise BundleError(f"precision must be one of {', '.join(MODEL_FILES)}")
        meta = read_meta(path)
        try:
            inputs = INPUTS[task_of(meta).name](path, meta)
        except ValueError as err:
            raise BundleError(str(err)) from None
        model_file = path / MODEL_FILES[precision]
        if not model_file.is_file():
            raise BundleError(f"{model_file}: missing")
        try:
            session = ort.InferenceSession(
                str(model_file),
                sess_options=(options or RuntimeOptions()).session_options(),
                providers=["CPUExecutionProvider"],
            )
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BundleError(f"{model_file}: onnxruntime cannot load it ({err})") from None
        problems = signature_problems(task_of(meta), meta.get("signature"), signature(session))
        if problems:
            raise BundleError(f"{model_file}: {'; '.join(problems)}")
        return cls(path=path, meta=meta, inputs=inputs, session=session,
                   precision=precision)

    @property
    def version(self) -> str:
        return str(self.meta["version"])

    @property
    def tokenizer(self) -> Tokenizer:
        """A text bundle's tokenizer (AttributeError for other tasks)."""
        return self.inputs.tokenizer

    @property
    def unk_id(self) -> int | None:
        """The tokenizer model's own unknown token ([UNK] for WordPiece), if it has one;
        None for a bundle without a tokenizer."""
        tokenizer = getattr(self.inputs, "tokenizer", None)
        unk = getattr(tokenizer.model, "unk_token", None) if tokenizer else None
        return tokenizer.token_to_id(unk) if unk else None

    @property
    def registry(self) -> dict | None:
        """registry.json of a promoted copy, else None (a candidate, a plain directory)."""
        record = self.path / "registry.json"
        return json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None

    def encode(self, items: list) -> list:
        """Each request item as the model takes it, exactly as in training: token ids
        for a text, a normalised float32 [channels, height, width] for an image."""
        return self.inputs.encode(items)

    def run(self, batch: list) -> np.ndarray:
        """Logits for a batch of encoded items (token ids are padded to the longest)."""
        return self.run_feeds(self.inputs.feeds(batch))

    def run_arrays(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """A text model's logits for padded arrays."""
        return self.run_feeds({"input_ids": input_ids, "attention_mask": attention_mask})

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        (logits,) = self.session.run(["logits"], feeds)
        return logits

    def predict_logits(self, items: list, batch_size: int = 64) -> np.ndarray:
        """Logits for any number of items, batched (texts by length), in input order."""
        return self.inputs.in_order(self.encode(items), batch_size, len(self.label_names),
                                    self.run)

    def predict_proba(self, items: list, batch_size: int = 64) -> np.ndarray:
        return softmax(self.predict_logits(items, batch_size))
