# stlib — two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv first.
# GPU users: make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
STEPS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.stlib-installed

.PHONY: setup demo test test-fast bench lint clean-results

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: an unpinned torch pulled in by a dependency can be a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e ".[dev]"
	$(BIN)/python -c "from stlib.adapters.mhc_kernels import compile_kernels; compile_kernels()"  # mHC CPU kernels, ~20 s once
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m stlib demo $(if $(STEPS),--max-steps $(STEPS),)

# Everything, on two workers (pytest-xdist): the notebooks, the scripts and the trainings overlap.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

# The unit tests alone (< 30 s): no training, subprocess, notebook or UMAP (pytest -m "not slow"; see tests/conftest.py).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/run.py

lint: setup
	$(BIN)/ruff check stlib tests benchmarks analysis tools

# Generated outputs only (runs, predictions, figures, logs, scripts); data/ and .venv stay.
clean-results:
	rm -rf results/runs results/predictions results/executed results/*.png results/*.csv logs/*.log train_scripts/*.sh
