"""Batch prediction over files: `predict_file(INPUT, OUT, model)`, or from a shell
`python -m serving.batch INPUT --out OUT`.

Each row's answer is what the service's /predict gives for its text (the same bundle,
precision, tokenizer and batching); see serving/batch/runner.py. Inputs: csv, tsv,
jsonl (each also .gz) and parquet; for an image bundle, a folder of images or such a
file of image paths (serving/batch/images.py); another kind of input is a reader
registered with `register_reader` (serving/batch/readers.py).
"""

from serving.batch.readers import BatchError, Record, RowReader, register_reader
from serving.batch.runner import BadRowsError, BatchSummary, predict_file

__all__ = ["BadRowsError", "BatchError", "BatchSummary", "Record", "RowReader",
           "predict_file", "register_reader"]
