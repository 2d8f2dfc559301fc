# Entry points: `make test`, `make demo`, `make lint`. Each first runs scripts/bootstrap.sh, which is
# idempotent (Debian packages, no system Orthanc running, .venv with the project installed editable).
SHELL := /bin/bash
VENV ?= .venv
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: bootstrap demo test lint

bootstrap:
	VENV_DIR=$(VENV) bash scripts/bootstrap.sh

demo: bootstrap
	$(VENV)/bin/tunnel-demo $(DEMO_ARGS)

test: bootstrap
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check .
