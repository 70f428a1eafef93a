# Quick start:  make demo   (set up, then run the demo)
#               make test   (set up, then run linters and the whole test suite)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# executor distributions; each is installed as its own distribution, as a user would
EXECUTORS := edgecompute_cpp edgecompute_wasm
TEST_PLUGINS := tests/plugins/edgecompute-testplugin tests/plugins/edgecompute-brokenplugin
# Debian packages the tests need: a C++17 compiler (cpp), clang + wasi-libc to build wasm modules (wasm)
DEBIAN_PACKAGES := g++ clang lld wasi-libc libclang-rt-dev-wasm32

.PHONY: setup system demo test lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml $(foreach e,$(EXECUTORS),$(e)/pyproject.toml)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]" $(foreach e,$(EXECUTORS),-e $(e)) \
		$(foreach p,$(TEST_PLUGINS),-e $(p))
	touch $@

setup: $(VENV)/.installed

# installs missing Debian packages when run as root (CI, fresh machines); otherwise says what is missing
system:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else echo "missing Debian packages (install them as root): $$missing"; exit 1; fi; \
	fi

demo: setup
	$(BIN)/edgecompute demo

lint: setup
	$(BIN)/ruff check edgecompute tests benchmarks $(EXECUTORS)

typecheck: setup
	$(BIN)/mypy

test: system lint typecheck
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/scheduler.py

clean:
	rm -rf $(VENV)
