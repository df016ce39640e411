"""Shared fixtures: a tiny generated study (source + wound healing), a tiny base model, velocity, shared runs.

Every test that uses the tiny study (so trains, or reads a trained run) is marked `slow` here; so are the tests marked
by hand (subprocesses, papermill, numba-compiled UMAP). `make test-fast` (pytest -m "not slow") runs the rest.
"""

import os  # noqa: I001  (stlib first: it sets the OpenMP wait policy before torch loads)
from pathlib import Path

import stlib  # noqa: F401

import pytest
import torch
from runs import executed_notebooks, finetuned, gene_base  # noqa: F401  (session-scoped trained runs, see tests/runs.py)
from stlib_testing import REPO, tiny_overrides

# Tiny models gain nothing from threads, and two threads stall badly when the other core is busy; the variable
# reaches the trainings the tests start in subprocesses (scripts, notebooks) too.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

TRAINED = {"tiny_study", "tiny_base", "velocity_data", "finetuned", "gene_base", "executed_notebooks"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINED & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> Path:
    """Generated data small enough for seconds-long runs: data/{wound_healing,source_perturbations}.{h5ad,toml}."""
    from stlib.data.synthetic import write_default_data

    root = tmp_path_factory.mktemp("study")
    write_default_data(root / "data", n_cells=900, n_genes=150, embed_dim=16, n_source_cells=900, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_base(tiny_study) -> Path:
    """A tiny pretrained base (source domain), shared by every fine-tuning test."""
    from stlib.config import load_config
    from stlib.train.run import train

    overrides = tiny_overrides(tiny_study, "base", "source_perturbations.toml", 30) + ["training.lr=3e-3"]
    return train(load_config(REPO / "configs" / "pretrain.yaml", overrides), overrides)


@pytest.fixture(scope="session")
def velocity_data(tiny_study) -> Path:
    """The tiny wound data with scvelo velocity in the model's space (what `stlib velocity` writes)."""
    from stlib.data.velocity import run_velocity

    path = tiny_study / "data" / "wound_healing.h5ad"
    run_velocity(path, embed_key="X_state", out_path=path, pert_col="condition", control_pert="Sham")
    return tiny_study
