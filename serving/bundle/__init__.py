"""The bundle: the contract the pipeline writes and the service loads.

numpy, onnxruntime and tokenizers only (no torch, nothing from `pipeline/`), so the
serving image and the pipeline run the very same loading, padding and scoring code.
"""

from serving.bundle.bundle import (
    MODEL_FILES,
    REGISTERED_BUNDLE,
    REQUIRED_META,
    Bundle,
    BundleError,
    RuntimeOptions,
    read_meta,
    softmax,
)

__all__ = ["MODEL_FILES", "REGISTERED_BUNDLE", "REQUIRED_META", "Bundle", "BundleError",
           "RuntimeOptions", "read_meta", "softmax"]
