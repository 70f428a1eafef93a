# Quick start:  make demo   (set up, then run the demo)
#               make test   (set up, then run linters and the whole test suite)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# executor distributions that have landed; each is installed as its own distribution
EXECUTORS :=
TEST_PLUGINS := tests/plugins/edgecompute-testplugin tests/plugins/edgecompute-brokenplugin

.PHONY: setup demo test lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml $(foreach e,$(EXECUTORS),$(e)/pyproject.toml)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]" $(foreach e,$(EXECUTORS),-e $(e)) \
		$(foreach p,$(TEST_PLUGINS),-e $(p))
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/edgecompute demo

lint: setup
	$(BIN)/ruff check edgecompute tests/core tests/plugins benchmarks/scheduler.py $(EXECUTORS)

typecheck: setup
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/scheduler.py

clean:
	rm -rf $(VENV)
