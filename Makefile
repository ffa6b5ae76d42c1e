# The product's entry points. Every target that runs project code depends on `setup`
# (directly or through `repro`), so on a fresh clone `make deploy` and `make test` work
# with nothing typed first; `serving-env` and `image` build environments of their own.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PORT ?= 8000
RUN_DIR ?= run
# How `make deploy` serves: auto (a Docker or Podman container when one works, else a
# local process), docker, podman, or process.
DEPLOY_RUNTIME ?= auto
# `make image BUNDLE=models/current` bakes that bundle into the image.
BUNDLE ?=
# The serving image's install steps, run outside Docker (see `serving-env`).
SERVE_VENV ?= build/serve-venv

export PATH := $(abspath $(VENV))/bin:$(PATH)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help setup params repro deploy undeploy rollback serve test test-fast bench tune lint report docs \
        serving-env image docker mlflow-ui clean retrain rules manifests

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[pipeline,dev]'
	@$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install everything (idempotent)

params: setup  ## recompose conf/ into params.yaml (make params OVERRIDES="model=lstm")
	$(PY) -m pipeline.config $(OVERRIDES)

repro: setup  ## run the pipeline stages that are out of date
	dvc repro

deploy: setup  ## bring the pipeline up to date and serve the champion on PORT (in a container if Docker or Podman works; DEPLOY_RUNTIME=process: never)
	$(VENV)/bin/textops deploy --port $(PORT) --run-dir $(RUN_DIR) --runtime $(DEPLOY_RUNTIME) $(ARGS)

undeploy: setup  ## stop the service or container started by `make deploy` (safe when none runs)
	$(VENV)/bin/textops undeploy --run-dir $(RUN_DIR)

# https when a certificate is set: `make deploy` then serves HTTPS only (serving/tls.py)
retrain: setup  ## read the service on PORT, retrain on its feedback if a trigger fires (ARGS="--dry-run" or "--force")
	$(VENV)/bin/textops retrain --service-url $(if $(strip $(TEXTOPS_TLS_CERT_FILE)),https,http)://127.0.0.1:$(PORT) $(ARGS)

rules:  ## check the Prometheus rules, their tests and scrape config (promtool), and that the Grafana dashboard is current
	promtool check rules ops/prometheus/alerts.yml
	promtool test rules ops/prometheus/alerts_test.yml
	promtool check config ops/prometheus/prometheus.yml
	$(PYTHON) ops/grafana/dashboard.py --check

rollback: setup  ## move champion and models/current back to the previous blessed version (or VERSION=n)
	$(VENV)/bin/textops rollback $(VERSION)

serve: setup  ## run the service in the foreground on models/current
	$(VENV)/bin/textops serve --bundle models/current --port $(PORT)

# pytest-xdist workers, each test file whole in one of them (its module fixtures built once);
# TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 2
TEST_ARGS := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: setup  ## run the test suite
	$(PY) -m pytest $(TEST_ARGS)

test-fast: setup  ## the tests that take seconds, not minutes
	$(PY) -m pytest $(TEST_ARGS) -m "not slow"

bench: repro  ## benchmarks (bench/): ratios against baselines measured in the same run
	$(PY) bench/bench_training.py
	$(PY) bench/bench_serving.py
	$(PY) bench/bench_logging.py

tune: setup  ## Optuna search; writes conf/experiment/tuned.yaml (make tune OVERRIDES="..." ARGS="--workers 2")
	$(VENV)/bin/textops tune $(ARGS) $(OVERRIDES)

lint: setup  ## ruff and hadolint
	$(VENV)/bin/ruff check pipeline serving ops textops tests bench
	$(VENV)/bin/hadolint Dockerfile

manifests: setup  ## check the Kubernetes and KServe manifests in ops/k8s/ offline (ops/k8s/manifests.py)
	$(PY) ops/k8s/manifests.py

serving-env:  ## install the serving image's dependencies into $(SERVE_VENV), as the Dockerfile does, and check them
	rm -rf $(SERVE_VENV) build/serve-src && mkdir -p build/serve-src
	cp -r pyproject.toml README.md serving build/serve-src/
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install --quiet --no-cache-dir './build/serve-src[serve,registry]'
	$(SERVE_VENV)/bin/python -c "import importlib.util as u; assert u.find_spec('torch') is None, 'torch in the serving image'"
	cd build && ../$(SERVE_VENV)/bin/python -c "import serving.api.app, serving.bundle, model_signing; print('serving image dependencies: ok')"

# The standard library is enough (ops/image.py): no need for .venv.
image:  ## build the serving image with Docker or Podman (BUNDLE=models/current bakes a bundle in)
	$(PYTHON) -m ops.image build $(if $(BUNDLE),--bundle $(BUNDLE))

docker: image  ## the same as `make image`

report: setup  ## one self-contained HTML page of the latest run: reports/report.html
	$(VENV)/bin/textops report

docs: setup  ## build the documentation site into build/site (mkdocs --strict)
	$(VENV)/bin/mkdocs build --strict --site-dir build/site

mlflow-ui: setup  ## the MLflow UI on http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:  ## remove pipeline outputs (not the venv, not the MLflow database)
	rm -rf data/raw data/processed models reports run build
