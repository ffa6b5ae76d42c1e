"""The inference service assembled: FastAPI on uvicorn, serving one model bundle.

Run it with `python -m serving` (settings from `TEXTOPS_*` environment variables, see
serving/settings.py) or `uvicorn --factory serving.api.app:create_app` (one process).

Routes (serving/api/routes.py, serving/api/v2.py)
- `POST /predict`, `POST /explain`, and the Open Inference Protocol under `/v2`;
- `POST /generate` for a next-word model (serving/api/next_word.py), whose requests
  share every decoding step (serving/engine/generation.py);
- `POST /feedback`: the right label for an answer, by its request id (the prediction
  log, serving/predlog/, keeps the answers; live accuracy goes to /metrics);
- `GET /health/live`, `GET /health/ready` (503 until every server process has a warm bundle),
  `GET /metadata`, `GET /metrics` (Prometheus), OpenAPI docs at `/docs`;
- `POST /admin/reload` (needs `TEXTOPS_ADMIN_TOKEN`);
- `GET /`: a demo page.

Requests are micro-batched (serving/engine/batcher.py); the model and the request
bounds are serving/engine/service.py's, its reloads serving/engine/following.py's.
`POST /predict` is answered by a plain ASGI handler ahead of FastAPI's routing
(serving/api/hot_path.py). With `TEXTOPS_WORKERS` above 1 (one per core by default)
serving/processes/supervisor.py runs that many processes of this app on one port;
serving/processes/workers.py keeps their metrics, drift windows and reloads together.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from serving import tls
from serving.api import next_word, routes, v2
from serving.api.errors import add_error_handlers
from serving.api.hot_path import PredictHotPath
from serving.api.middleware import BodySizeLimit, RequestMetrics
from serving.api.security import api_key_dependency
from serving.engine.service import InferenceService
from serving.predlog.crypto import check_log
from serving.predlog.store import PredictionLogError
from serving.processes.supervisor import Supervisor
from serving.processes.workers import MULTIPROC_ENV
from serving.settings import Settings, SettingsError


def create_app(settings: Settings | None = None) -> FastAPI:
    service = InferenceService(settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()  # uvicorn has finished the requests in flight by now

    # FastAPI's own OpenTelemetry instrumentation costs a span per request; the
    # service reports through Prometheus instead.
    app = FastAPI(title="textops text classifier",
                  description="Classifies texts with the deployed model bundle.",
                  lifespan=lifespan,
                  telemetry={"tracing": False, "metrics": False, "logs": False,
                             "operation_spans": False})
    app.state.service = service
    app.add_middleware(BodySizeLimit, max_bytes=service.settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    app.add_middleware(PredictHotPath, service=service)  # added last: runs first
    add_error_handlers(app)
    require_key = api_key_dependency(service.settings.api_key_list())
    app.include_router(routes.router(service, require_key))
    app.include_router(next_word.generate_router(service, require_key))
    app.include_router(v2.v2_router(service, require_key))
    # the demo page's scripts and style sheet (GET / serves the page itself)
    app.mount("/static", StaticFiles(packages=[("serving.api", "static")]), name="static")
    return app


def worker_app() -> FastAPI:
    """The app of one server process, its settings from the environment: what
    serving/processes/supervisor.py starts in each worker (`TEXTOPS_WORKERS` above 1)."""
    settings = Settings.from_env()
    configure_process(settings)
    return create_app(settings)


def configure_process(settings: Settings) -> None:
    sys.setswitchinterval(settings.switch_interval_ms / 1000)  # process-wide: set here only
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


def main() -> None:
    import uvicorn

    try:
        settings = Settings.from_env()
    except SettingsError as err:  # a clear message, not a traceback
        sys.exit(f"serving: {err}")
    configure_process(settings)
    # An encrypted log and no key, or keys that cannot open it: no start
    # (serving/predlog/crypto.py; the log's writer checks again whenever it connects).
    try:
        if settings.prediction_log:
            check_log(settings.prediction_log, settings.log_cipher())
    except PredictionLogError as err:
        sys.exit(f"serving: {err}")
    options = {"host": settings.host, "port": settings.port, "log_level": "info",
               "access_log": False,
               "timeout_graceful_shutdown": int(settings.request_timeout_s * 3)}
    try:  # HTTPS: every worker gets the certificate (serving/tls.py)
        options.update(tls.server_options(settings))
    except SettingsError as err:
        sys.exit(f"serving: {err}")
    workers = settings.worker_count()
    if workers == 1:
        uvicorn.run(create_app(settings), **options)
        return
    # The workers share metrics, drift windows and reloads through one directory
    # (serving/processes/workers.py), empty at start: files of an earlier run would be counted.
    with tempfile.TemporaryDirectory(prefix="textops-workers-") as shared:
        os.environ[MULTIPROC_ENV] = shared
        os.environ["TEXTOPS_WORKERS"] = str(workers)
        supervisor = Supervisor(workers, options, Path(shared),
                                grace_s=options["timeout_graceful_shutdown"] + 10,
                                hang_s=settings.worker_timeout_s)
        code = supervisor.run()
    sys.exit(code)


if __name__ == "__main__":
    main()
