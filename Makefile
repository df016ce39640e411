# stlib — two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv first.
# GPU users: make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
STEPS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.stlib-installed

.PHONY: setup demo test test-fast test-browser lab bench bench-scale lint clean-results
LAB_PORT ?= 8888

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: an unpinned torch pulled in by a dependency can be a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e ".[dev]"
	$(BIN)/python -c "from stlib.adapters.mhc_kernels import compile_kernels; compile_kernels()"  # mHC CPU kernels, ~20 s once
	# the project's Jupyter kernel, inside the venv: the notebooks name it, so they open on this interpreter
	$(BIN)/python -m ipykernel install --sys-prefix --name stlib --display-name "Python (stlib)"
	# ipykernel warns at every start that local TCP is unencrypted: one third-party line in every notebook run's log
	$(BIN)/python -c "import json, pathlib, sys; p = pathlib.Path(sys.prefix, 'share/jupyter/kernels/stlib/kernel.json'); k = json.loads(p.read_text()); k['argv'] += ['--IPKernelApp.log_level=ERROR']; p.write_text(json.dumps(k, indent=1))"
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

# JupyterLab at the repository root on the project's venv and kernel; it prints the URL (with its token) to open.
lab: setup
	$(BIN)/jupyter lab --no-browser --ip 127.0.0.1 --port $(LAB_PORT) --ServerApp.root_dir=$(CURDIR) \
	  $(if $(filter 0,$(shell id -u)),--allow-root,) notebooks/train_all_variants.ipynb

# Both notebooks, executed on a tiny study, opened in JupyterLab in headless Chromium (Debian's chromium and
# chromium-driver, installed here if missing); screenshots land in docs/figures/.
test-browser: setup
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get install -y -q chromium chromium-driver || (apt-get update -q && apt-get install -y -q chromium chromium-driver))
	STLIB_SCREENSHOTS=docs/figures $(BIN)/python -m pytest -q tests/test_browser.py

# The users' real size (57,298 cells, an ST-Tahoe-shaped base): every stage timed -> benchmarks/scale.md (~30 min here)
bench-scale: setup
	$(BIN)/python benchmarks/bench_scale.py

bench: setup
	$(BIN)/python benchmarks/run.py

lint: setup
	$(BIN)/ruff check stlib tests benchmarks analysis tools

# Generated outputs only (runs, predictions, figures, logs, scripts); data/ and .venv stay.
clean-results:
	rm -rf results/runs results/predictions results/executed results/*.png results/*.csv logs/*.log train_scripts/*.sh
