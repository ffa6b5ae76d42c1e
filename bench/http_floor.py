"""The HTTP floor for bench_serving.py: FastAPI on uvicorn, as the service runs them
(the same versions, one process per core, no access log), answering every
`POST /predict` with a fixed JSON body after reading the request's, and nothing else:
no JSON parsing, decoding, model, batching or log.

Its throughput is what any FastAPI service could reach on this machine with this load
generator beside it; the service's share of it is what its own work costs, and an
in-process-limit target above it cannot be met by an HTTP service of this stack.

    python bench/http_floor.py PORT [WORKERS]
"""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI, Request, Response

app = FastAPI()
ANSWER = (b'{"request_id":"0","model_version":"floor","predictions":[{"label":"a",'
          b'"score":1.0,"probabilities":{"a":1.0}}]}')


@app.post("/predict")
async def predict(request: Request) -> Response:
    await request.body()
    return Response(ANSWER, media_type="application/json")


@app.get("/health")
async def health() -> dict:
    return {"status": "ok"}


if __name__ == "__main__":
    port, workers = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1
    uvicorn.run("http_floor:app", host="127.0.0.1", port=port, workers=workers,
                access_log=False, log_level="warning")
