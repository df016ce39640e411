"""Synthetic pred/real file pairs with a known perturbation effect, in the layout `stlib predict` writes.

Two cell types x three days x Sham/Burn, G=30 genes, D=8 embedding dims (a fixed linear map of X, so
shifts carry over). The real Burn effect grows with time (x1, x2, x4 plus a small rotation), so the
temporal axis is well defined. `make_pair(kind)` returns (pred, real) where pred is:
perfect (the real cells), resampled (fresh cells, same distribution), reversed (effect negated),
shuffled_days (each day predicted with another day's effect) or control (the control-mean baseline).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

G, D, SIGMA = 30, 8, 0.3
GROWTH = {10: 1.0, 14: 2.0, 19: 4.0}


def _cells(rng, centre, n):
    return centre + SIGMA * rng.standard_normal((n, len(centre)))


def _build(cell_types, days, n, seed, space, batch):
    rng = np.random.default_rng(seed)
    proj = rng.standard_normal((G, D)) / np.sqrt(G)
    base = {c: rng.normal(2.0, 0.5, G) for c in cell_types}
    drift = {t: rng.normal(0.0, 0.2, G) for t in days}
    effect = {c: rng.normal(0.0, 1.0, G) for c in cell_types}
    twist = {c: rng.normal(0.0, 0.3, G) for c in cell_types}
    blocks, obs = [], []
    centres = {}
    for c in cell_types:
        for t in days:
            ctrl = base[c] + drift[t]
            burn = ctrl + GROWTH.get(t, 1.0) * effect[c] + (GROWTH.get(t, 1.0) ** 2 / 16) * twist[c]
            centres[c, t] = (ctrl, burn)
            for pert, centre in (("Sham", ctrl), ("Burn", burn)):
                blocks.append(_cells(rng, centre, n))
                obs.append(
                    pd.DataFrame(
                        {
                            "condition": pert,
                            "cell_type": c,
                            "day": t,
                            "mouse_id": [f"{pert}_m{i % 2}" for i in range(n)],
                            "group_id": f"{pert}|{c}|{t}",
                        }
                    )
                )
    X = np.vstack(blocks).astype(np.float32)
    obs = pd.concat(obs, ignore_index=True)
    obs["source_index"] = np.arange(len(obs))
    obs.index = [f"cell{i}" for i in range(len(obs))]
    for col in ("condition", "cell_type", "mouse_id"):
        obs[col] = obs[col].astype("category")
    if not batch:
        obs = obs.drop(columns="mouse_id")
    mean_effect = np.mean([burn - ctrl for ctrl, burn in centres.values()], axis=0)
    emb = X @ proj
    keys = sorted(centres)
    shifts = np.stack([centres[k][1] - centres[k][0] for k in keys])  # the true shift of every (cell type, day)
    train_groups = {"pert": np.array(["Burn"] * len(keys)), "cell_type": np.array([c for c, _ in keys]),
                    "time": np.array([str(t) for _, t in keys]),
                    "X": shifts if space == "gene" else shifts @ proj, "embedding": shifts @ proj}
    uns = {
        "stlib": {
            "model": "real",
            "embed_key": "X_emb",
            "pert_col": "condition",
            "control_pert": "Sham",
            "cell_type_key": "cell_type",
            "time_col": "day",
            "batch_col": "mouse_id" if batch else "",
            "space": space,
            "split": "test",
            "train_mean_shift_X": {"Burn": mean_effect if space == "gene" else mean_effect @ proj},
            "train_mean_shift_embedding": {"Burn": mean_effect @ proj},
            "train_groups": train_groups,
        }
    }
    if space == "gene":
        real = AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"gene{i}" for i in range(G)]), uns=uns)
    else:
        real = AnnData(
            X=emb.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"emb_{i}" for i in range(D)]), uns=uns
        )
    real.obsm["X_emb"] = emb.astype(np.float32)
    return real, proj, centres, rng


def _with_cells(real, new_gene_cells, proj, model, space):
    """Copy of real whose Burn cells are replaced by new gene-space cells (same rows)."""
    pred = real.copy()
    burn = (pred.obs["condition"] == "Burn").to_numpy()
    genes = np.asarray(pred.X if space == "gene" else np.zeros((pred.n_obs, G)), dtype=np.float64)
    genes[burn] = new_gene_cells
    emb = genes @ proj
    if space == "gene":
        pred.X[burn] = genes[burn].astype(np.float32)
    else:
        pred.X[burn] = emb[burn].astype(np.float32)
    pred.obsm["X_emb"][burn] = emb[burn].astype(np.float32)
    pred.uns["stlib"]["model"] = model
    return pred


@pytest.fixture
def make_pair():
    def make(kind="perfect", cell_types=("A", "B"), days=(10, 14, 19), n=40, seed=0, space="gene", batch=True):
        real, proj, centres, rng = _build(cell_types, days, n, seed, space, batch)
        if kind == "perfect":
            pred = real.copy()
            pred.uns["stlib"]["model"] = "perfect"
            return pred, real
        if kind == "control":
            from stlib.evaluate.baselines import control_mean_baseline

            return control_mean_baseline(real), real
        # rebuild the Burn cells in gene space from the centres, in the same row order as _build
        order = [(c, t) for c in cell_types for t in days]
        shuffled = {t: days[(i + 1) % len(days)] for i, t in enumerate(days)}
        cells = []
        for c, t in order:
            ctrl, burn = centres[c, t]
            if kind == "resampled":
                cells.append(_cells(rng, burn, n))
            elif kind == "reversed":
                cells.append(_cells(rng, ctrl - (burn - ctrl), n))
            elif kind == "shuffled_days":
                other_ctrl, other_burn = centres[c, shuffled[t]]
                cells.append(_cells(rng, ctrl + (other_burn - other_ctrl), n))
            else:
                raise ValueError(f"unknown kind {kind!r}")
        return _with_cells(real, np.vstack(cells), proj, kind, space), real

    return make
