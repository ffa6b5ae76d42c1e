"""The naive baseline: FastAPI calling the PyTorch checkpoint once per request.

No batching, no ONNX: what a first version of a model service usually is.
    python bench/naive_server.py CHECKPOINT TOKENIZER PORT
"""

from __future__ import annotations

import sys

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from tokenizers import Tokenizer

from pipeline.tasks.text_classification.inference import load_module


class PredictRequest(BaseModel):
    texts: list[str]


def create_app(checkpoint: str, tokenizer_file: str) -> FastAPI:
    module = load_module(checkpoint).eval()
    tokenizer = Tokenizer.from_file(tokenizer_file)
    names = list(module.hparams.label_names)
    pad_id = module.hparams.pad_id
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(request: PredictRequest) -> dict:  # sync: FastAPI runs it in a thread
        encoded = [e.ids for e in tokenizer.encode_batch(request.texts)]
        longest = max(map(len, encoded))
        ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(encoded):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        with torch.inference_mode():
            probs = torch.softmax(module(ids, mask), -1)
        return {"predictions": [{"label": names[int(p.argmax())], "score": float(p.max())}
                                for p in probs]}

    return app


if __name__ == "__main__":
    checkpoint, tokenizer_file, port = sys.argv[1:4]
    uvicorn.run(create_app(checkpoint, tokenizer_file), host="127.0.0.1", port=int(port),
                log_level="warning", access_log=False)
