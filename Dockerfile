# The serving image: onnxruntime + tokenizers + FastAPI (+ mlflow-skinny to follow a
# registry alias), no torch, no pipeline code, run as a non-root user.
# Its dependencies are the ones `make serving-env` installs and checks outside a container.
# `make image` builds it with Docker or Podman (ops/image.py); by hand:
#
# Bundle mounted read-only at run time (what `make deploy` does); the container
# follows models/current, a relative link inside the mounted models/:
#   docker build --target runtime -t textops-serving .
#   docker run -p 127.0.0.1:8000:8000 -v "$PWD/models:/models:ro" textops-serving
# Bundle copied in at build time (a self-contained image):
#   docker build --build-arg BUNDLE=models/bundles/3 -t textops-serving:v3 .
#   docker run -p 127.0.0.1:8000:8000 textops-serving:v3
#
# BASE_IMAGE is any Debian-like image with Python 3.11 and its venv module: the
# conventional python:3.11-slim (python3 in /usr/local/bin), or, where no registry can
# be reached, a Debian bookworm root made by mmdebstrap (python3 in /usr/bin; see
# ops/base_image.py). Only `python3` is called before the venv exists, which both have.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /src
# The dependencies alone (pyproject.toml's serve and registry extras, read with the
# standard library), in a layer that only pyproject.toml decides. The pip cache survives
# between builds (BuildKit and Buildah cache mounts) and never reaches the image.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/venv \
    && python3 -c "import tomllib; extras = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']; print('\n'.join(extras['serve'] + extras['registry']))" > requirements.txt \
    && /opt/venv/bin/pip install --requirement requirements.txt

FROM ${BASE_IMAGE} AS runtime
RUN useradd --create-home --uid 10001 --user-group app
COPY --from=build /opt/venv /opt/venv
# The service's code on PYTHONPATH rather than installed: a change to it adds a small
# layer over the unchanged environment (installing it would copy all of /opt/venv again).
COPY serving /opt/textops/serving
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/textops \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TEXTOPS_HOST=0.0.0.0 \
    TEXTOPS_PORT=8000 \
    TEXTOPS_BUNDLE=/models/current
USER 10001
WORKDIR /home/app
EXPOSE 8000
# /health/live on the service's own port, over HTTPS when TEXTOPS_TLS_CERT_FILE is set
# (serving/healthcheck.py). HTTPS and signed bundles need no other change to the image:
# mount the certificate, its key and the public key, and set TEXTOPS_TLS_CERT_FILE,
# TEXTOPS_TLS_KEY_FILE and TEXTOPS_BUNDLE_PUBLIC_KEY (docs/deployment.md).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-m", "serving.healthcheck"]
# Exec form: the service is PID 1 and gets the runtime's SIGTERM itself; it drains the
# requests in flight and exits 0.
CMD ["python", "-m", "serving"]

FROM runtime AS baked
ARG BUNDLE=models/current
# root-owned and world-readable: the service reads its bundle and cannot change it
COPY ${BUNDLE} /models/baked
ENV TEXTOPS_BUNDLE=/models/baked
