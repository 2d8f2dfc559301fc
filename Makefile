# Entry points: `make test`, `make demo`, `make lint`. Each first runs scripts/bootstrap.sh, which is
# idempotent (Debian packages, no system Orthanc running, .venv with the project installed editable).
# The demo, the benchmark and the dev kit are development packages: they run from this checkout
# (`python -m tunnel_demo`, `python -m tunnel_bench`), never from the installed wheel.
SHELL := /bin/bash
VENV ?= .venv
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=

.PHONY: bootstrap demo test lint bench

bootstrap:
	VENV_DIR=$(VENV) bash scripts/bootstrap.sh

demo: bootstrap
	$(VENV)/bin/python -m tunnel_demo $(DEMO_ARGS)

test: bootstrap
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check .

# The benchmark suite (docs/benchmarks/README.md): BENCH_ARGS=--quick for a CI-size run (< 5 min).
# Its extras (its own sshd, a stunnel pair, matplotlib) are installed here only, never for `make test`.
bench:
	VENV_DIR=$(VENV) BOOTSTRAP_EXTRA_DEBS="openssh-server stunnel4" BOOTSTRAP_EXTRA_PIP="matplotlib" \
		bash scripts/bootstrap.sh
	$(VENV)/bin/python -m tunnel_bench $(BENCH_ARGS)
