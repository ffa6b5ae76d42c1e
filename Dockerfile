# The serving image: onnxruntime + tokenizers + FastAPI (+ mlflow-skinny to follow a
# registry alias), no torch, no pipeline code.
# Its install steps are the ones `make serving-env` runs and checks outside Docker.
#
# Bundle mounted at run time (what `make deploy` does when a Docker engine runs):
#   docker build --target runtime -t textops-serving .
#   docker run -p 8000:8000 -v "$PWD/models:/models:ro" textops-serving
# Bundle copied in at build time (a self-contained image; `make docker`):
#   docker build --build-arg BUNDLE=models/bundles/3 -t textops-serving:v3 .
#   docker run -p 8000:8000 textops-serving:v3

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY serving ./serving
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir './[serve,registry]'

FROM python:3.11-slim AS runtime
RUN useradd --create-home --uid 10001 --user-group app
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TEXTOPS_HOST=0.0.0.0 \
    TEXTOPS_PORT=8000 \
    TEXTOPS_BUNDLE=/models/current
USER 10001
WORKDIR /home/app
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=2).status != 200)"]
CMD ["python", "-m", "serving"]

FROM runtime AS baked
ARG BUNDLE=models/current
COPY --chown=10001:10001 ${BUNDLE} /models/baked
ENV TEXTOPS_BUNDLE=/models/baked
