"""Tiny AnnData + split TOML builders for the split and DataModule tests.

Every cell's embedding starts with its own row number (column 0) so a test can check which cells a batch
gathered; columns 1.. are noise.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from stlib.config import DataConfig

CONTROL = "ctrl"


def make_adata(cells_per_combo: int = 12, cell_types=("A", "B", "C"), perts=(CONTROL, "p1", "p2"),
               mice=(("m1", 10), ("m2", 14)), dim: int = 6, n_genes: int = 5, velocity: bool = False,
               seed: int = 0, skip=()) -> ad.AnnData:
    """cells_per_combo cells for each (cell type, perturbation, mouse); mice are (id, day) pairs. `skip`
    lists (cell type, pert, mouse) combinations to leave out."""
    rng = np.random.default_rng(seed)
    rows = []
    for ct, pert, (mouse, day) in itertools.product(cell_types, perts, mice):
        if (ct, pert, mouse) in skip:
            continue
        rows += [{"cell_types_simple_short": ct, "condition": pert, "mouse_id": mouse, "day": day}] * cells_per_combo
    obs = pd.DataFrame(rows)
    obs.index = [f"cell{i}" for i in range(len(obs))]
    n = len(obs)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    emb[:, 0] = np.arange(n)
    genes = rng.poisson(2.0, size=(n, n_genes)).astype(np.float32)
    adata = ad.AnnData(X=genes, obs=obs)
    adata.var_names = [f"g{i}" for i in range(n_genes)]
    adata.obsm["X_state"] = emb
    adata.layers["log1p"] = np.log1p(genes)
    if velocity:
        adata.obsm["velocity_X_state"] = rng.normal(size=(n, dim)).astype(np.float32)
        adata.obs["velocity_confidence"] = rng.uniform(size=n).astype(np.float32)
    return adata


def write_h5ad(adata: ad.AnnData, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    return path


def write_toml(folder: Path, text: str, name: str = "split.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def data_cfg(toml: Path, **over) -> DataConfig:
    base = {"toml_config_path": str(toml), "embed_key": "X_state", "pert_col": "condition", "control_pert": CONTROL,
                "cell_type_key": "cell_types_simple_short", "batch_col": "mouse_id", "time_col": "day",
            "gene_layer": "log1p",
            "sets_per_group": 3}
    return DataConfig(**(base | over))


def single_dataset(tmp_path: Path, adata: ad.AnnData | None = None, extra: str = "") -> Path:
    """One dataset 'exp' (file exp.h5ad next to the TOML) that trains, plus `extra` TOML text."""
    write_h5ad(adata if adata is not None else make_adata(), tmp_path / "exp.h5ad")
    return write_toml(tmp_path, f'[datasets]\nexp = "exp.h5ad"\n[training]\nexp = "train"\n{extra}')
