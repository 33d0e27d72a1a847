# The two commands of the README: `make demo` and `make test`. Everything they need is set up
# from nothing: a virtual environment, torch (the CPU wheel unless a CUDA torch is already
# importable), the project with its test extras, the services the tests start themselves, and
# the separate venv vwlmm-eval runs lmms-eval in (`make eval-env`).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vwlmm-installed
# lmms-eval's own venv (pipeline/eval_env.py): its pins conflict with the training venv's.
EVAL_ENV ?= build/eval-env
EVAL_STAMP := $(EVAL_ENV)/.vwlmm-eval-env
PYTEST_ARGS ?=

.PHONY: venv eval-env test demo clean help

help:
	@echo "make demo   - preprocess (Ray) -> train (TP/PP, torchrun) -> checkpoint -> HF export, on CPU"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make eval-env - the venv vwlmm-eval runs lmms-eval in ($(EVAL_ENV), a few GB)"

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# Never replace a CUDA build on a GPU host; otherwise take the CPU wheel (an open range
	@# would pull a multi-GB CUDA build).
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch present: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# Nothing to do when the venv holds eval_requirements.txt's pins (the stamp records them).
$(EVAL_STAMP): pipeline/eval_env.py pipeline/eval_requirements.txt | $(STAMP)
	VWLMM_EVAL_ENV=$(EVAL_ENV) $(PY) -m pipeline.eval_env

eval-env: $(EVAL_STAMP)

test: venv eval-env
	bash scripts/system_deps.sh
	$(PY) -m pytest $(PYTEST_ARGS) tests

demo: venv
	$(PY) -m pipeline.demo

clean:
	rm -rf $(VENV) build *.egg-info demo_out
