"""How much the pipeline says: by default one readable line per step, and the
dependencies' chatter hidden at its source; everything with `TEXTOPS_VERBOSE=1`
(`textops -v ...`), which the stages' processes inherit from the command.

Each entry point calls `quiet()` first. What is hidden, and why it is safe to hide:"""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "TEXTOPS_VERBOSE"
OWN_LOGGERS = ("pipeline", "serving", "textops")

# Loggers whose INFO lines repeat what the stage's own line says, or describe the machine.
NOISY_LOGGERS = {
    # database table creation, experiment creation, signature validation
    "mlflow": logging.WARNING,
    # "GPU available: False", the LitLogger tip, "Seed set to 42", "`Trainer.fit` stopped"
    "pytorch_lightning": logging.WARNING,
    "lightning.pytorch": logging.WARNING,
    "lightning_fabric": logging.WARNING,
    "lightning.fabric": logging.WARNING,
    # the ONNX exporter registers torchvision's operators and warns that it is absent:
    # no model here uses them
    "torch.onnx": logging.ERROR,
    "transformers": logging.ERROR,
    "datasets": logging.WARNING,
    "alembic": logging.WARNING,
    "httpx": logging.WARNING,
    # Flower's per-round lines (train says its own) and its notices that the gRPC
    # server and client functions used here are deprecated in favour of its
    # SuperLink deployment runtime, which the train stage does not use
    "flwr": logging.ERROR,
}

# The ONNX exporter registers torchvision's operators and warns, on every export, that
# torchvision is absent: no model here uses them.
TORCHVISION_NOTICES = "torch.onnx._internal.exporter._registration"

# Warnings raised inside dependencies about their own internals: (category, message
# pattern, why it does not concern the user).
KNOWN_WARNINGS = [
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated",
     "Lightning 2.6 calls an old torch pytree API; nothing to change on our side"),
    (UserWarning, r"# The axis name: \w+ will not be used",
     "the ONNX exporter merges axes that share constraints; the exported model keeps "
     "its batch and sequence axes dynamic (checked by the bundle's signature)"),
    (UserWarning, r"Exporting a model to ONNX with a batch_size other than 1, with a "
     r"variable length with LSTM",
     "the deploy stage checks what it warns of: each text's logits alone must match its "
     "logits inside a padded batch (deploy.int8_batch_max_abs_diff), or nothing ships"),
    (UserWarning, r"Checkpoint directory .* exists and is not empty",
     "train keeps its work directory on purpose: an interrupted run resumes from it"),
    (UserWarning, r"The number of training batches \(\d+\) is smaller than the logging interval",
     "metrics are logged per epoch, not per step"),
    (UserWarning, r"The '\w+_dataloader' does not have many workers",
     "the data is tokenised in memory: more loader workers only add processes"),
    (UserWarning, r"Full backward hook is firing when gradients are computed with respect "
     r"to module outputs",
     "Opacus's per-example gradient hooks on a model's first layer, whose input (the "
     "data) needs no gradient: what private training expects"),
    (UserWarning, r"You defined a `validation_step` but have no `val_dataloader`",
     "a federated client trains without validating: the server validates the averaged "
     "model after every round"),
    (UserWarning, r"Optimal order is the largest alpha",
     "Opacus's search for the noise multiplier tries very small noise on its way; the "
     "epsilon reported is the accountant's for the noise chosen"),
]


def errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet() -> None:
    """Set up logging for an entry point: readable lines on stderr, dependencies quiet
    unless TEXTOPS_VERBOSE is set."""
    # The root at WARNING: a dependency's INFO lines (the ONNX optimiser's rewrites, ...)
    # stay hidden; the product's own loggers say what they do.
    logging.basicConfig(level=logging.DEBUG if verbose() else logging.WARNING,
                        format="%(message)s", stream=sys.stderr)
    if verbose():
        return
    for ours in OWN_LOGGERS:
        logging.getLogger(ours).setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Loading weights" bars
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:  # imported before us: its bars read the env at import
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    for name, level in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    # torch resets its own loggers' levels when the ONNX exporter starts; a filter on
    # the logger that announces the absent torchvision operators outlasts that
    notices = logging.getLogger(TORCHVISION_NOTICES)
    if errors_only not in notices.filters:
        notices.addFilter(errors_only)
    for category, pattern, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
