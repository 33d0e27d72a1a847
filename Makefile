# The two commands of the README: `make demo` and `make test`. Everything they need is set up
# from nothing: a virtual environment, torch (the CPU wheel unless a CUDA torch is already
# importable), the project with its test extras, and the services the tests start themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vwlmm-installed
PYTEST_ARGS ?=

.PHONY: venv test demo clean help

help:
	@echo "make demo   - preprocess (Ray) -> train (TP/PP, torchrun) -> checkpoint -> HF export, on CPU"
	@echo "make test   - set up .venv and run the test suite"

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

test: venv
	bash scripts/system_deps.sh
	$(PY) -m pytest $(PYTEST_ARGS) tests

demo: venv
	$(PY) -m pipeline.demo

clean:
	rm -rf $(VENV) build *.egg-info demo_out
