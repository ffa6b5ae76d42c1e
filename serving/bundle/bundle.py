"""A model bundle: the contract between the pipeline and the service.

A bundle is a directory holding
- `model.onnx` (fp32) and `model.int8.onnx` (statically quantised int8),
- `tokenizer.json`, which carries the text normalisation and personal-data masking,
- `bundle.json`: its task and the model's signature (serving/bundle/tasks.py), label
  names, max length, version, metrics, gate verdict, lineage and the training data
  profile (the drift reference),
- `MODEL_CARD.md`,
- and, in a copy the registry promoted, `registry.json`: the registry version, the
  MLflow run and the git commit (kept out of bundle.json, which the same training
  must write byte for byte in any clone).

Loading needs onnxruntime, tokenizers and numpy only: no torch, no pickle, nothing
from `pipeline/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from serving.bundle.tasks import TaskSpec, signature, signature_problems, task_of
from serving.bundle.tensors import in_length_order, pad

MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
# Where a registered model version keeps its bundle, inside the version's artifacts.
REGISTERED_BUNDLE = Path("artifacts") / "bundle"
REQUIRED_META = ("version", "label_names", "max_length", "pad_id")


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
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise BundleError(f"{meta_file}: missing fields {', '.join(missing)}")
    try:
        task_of(meta)
    except KeyError as err:
        raise BundleError(f"{meta_file}: {err.args[0]}") from None
    return meta


@dataclass
class Bundle:
    path: Path
    meta: dict
    tokenizer: Tokenizer
    session: ort.InferenceSession
    precision: str
    label_names: list[str] = field(init=False)
    task: TaskSpec = field(init=False)

    def __post_init__(self):
        self.label_names = list(self.meta["label_names"])
        self.task = task_of(self.meta)

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
        tokenizer_file = path / "tokenizer.json"
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # tokenizers raises a bare Exception
            raise BundleError(f"{tokenizer_file}: cannot load ({err})") from None
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
        return cls(path=path, meta=meta, tokenizer=tokenizer, session=session,
                   precision=precision)

    @property
    def version(self) -> str:
        return str(self.meta["version"])

    @property
    def unk_id(self) -> int | None:
        """The tokenizer model's own unknown token ([UNK] for WordPiece), if it has one."""
        unk = getattr(self.tokenizer.model, "unk_token", None)
        return self.tokenizer.token_to_id(unk) if unk else None

    @property
    def registry(self) -> dict | None:
        """registry.json of a promoted copy, else None (a candidate, a plain directory)."""
        record = self.path / "registry.json"
        return json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids, normalised, masked and truncated exactly as in training."""
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def run(self, batch: list[list[int]]) -> np.ndarray:
        """Logits for a batch of token id lists, padded to the batch's longest."""
        return self.run_arrays(*pad(batch, self.meta["pad_id"]))

    def run_arrays(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        (logits,) = self.session.run(
            ["logits"], {"input_ids": input_ids, "attention_mask": attention_mask}
        )
        return logits

    def predict_logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Logits for any number of texts, batched by length, in the input order."""
        return in_length_order(self.encode(texts), batch_size, len(self.label_names),
                               self.run)

    def predict_proba(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return softmax(self.predict_logits(texts, batch_size))
