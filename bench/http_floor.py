"""The HTTP floor for bench_serving.py: uvicorn with the service's options (the same
version, one process per core, no access log) and a bare ASGI app that reads each
`POST /predict` body and answers a fixed JSON body, and nothing else: no JSON
parsing, decoding, model, batching or log.

The service answers `POST /predict` in a plain ASGI handler ahead of FastAPI's
routing (serving/api/hot_path.py), so this, not a FastAPI endpoint, is the least
HTTP costs it here beside this load generator: the service's share of it is what its
own work costs, and an in-process-limit target is out of reach for any service on
this stack when the floor and the limit together (1 / (1/floor + 1/limit)) fall
short of it.

    python bench/http_floor.py PORT [WORKERS]
"""

from __future__ import annotations

import sys

import uvicorn

ANSWER = (b'{"request_id":"0","model_version":"floor","predictions":[{"label":"a",'
          b'"score":1.0,"probabilities":{"a":1.0}}]}')
HEADERS = [(b"content-type", b"application/json"),
           (b"content-length", str(len(ANSWER)).encode())]


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":  # lifespan: nothing to start
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        return
    more = True
    while more:  # the whole body, as the service reads it
        message = await receive()
        more = message.get("more_body", False)
    status = 200 if scope["path"] in ("/predict", "/health") else 404
    await send({"type": "http.response.start", "status": status, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


if __name__ == "__main__":
    port, workers = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1
    uvicorn.run("http_floor:app", host="127.0.0.1", port=port, workers=workers,
                access_log=False, log_level="warning")
