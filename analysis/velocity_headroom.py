"""Does RNA velocity carry what the mean-shift baseline lacks on held-out cell types? (embedding space)

For every Burn group (cell type x mouse) the real shift is the group mean minus its Sham controls' mean (same cell
type and day). Baseline: the training mean shift (mean over training cell types of Burn - Sham). Candidate: the
baseline + alpha x the mean scvelo velocity of the group's controls, alpha fitted by least squares on the training
cell types' groups. Prints the mean Pearson r over groups for both, on the training and the held-out (test) types,
with scvelo's velocity and with the simulation's true velocity. Exact group means: no sampling of control sets.
Then the same in gene space, where the baseline is the training mean shift of the genes themselves and the
candidate is read out from the embedding by a ridge regression fitted on the training types' cells (penalty 0.01
per cell, as a new gene decoder's linear readout): what an embedding model with velocity can reach in genes.

    .venv/bin/python benchmarks/velocity_headroom.py [data/wound_healing.h5ad]   (after `make demo`)
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import anndata as ad
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "data" / "wound_healing.h5ad"
    held_out = tomllib.loads((path.parent / "wound_healing.toml").read_text())["zeroshot"]
    adata = ad.read_h5ad(path)
    emb = adata.obsm["X_state"]
    obs = adata.obs
    ct, cond, day, mouse = (obs[c].astype(str).to_numpy() for c in ("cell_types_simple_short", "condition", "day",
                                                                     "mouse_id"))
    split = {key.split(".", 1)[1]: value for key, value in held_out.items()}
    train_types = sorted(set(ct) - set(split))
    test_types = sorted(c for c, s in split.items() if s == "test")
    shift = np.mean([emb[(ct == c) & (cond == "Burn")].mean(0) - emb[(ct == c) & (cond == "Sham")].mean(0)
                     for c in train_types], axis=0)

    def groups(types, velocity):
        for c in types:
            for m in sorted(set(mouse[(ct == c) & (cond == "Burn")])):
                g = (ct == c) & (cond == "Burn") & (mouse == m)
                ctrl = (ct == c) & (cond == "Sham") & (day == day[g][0])
                yield emb[g].mean(0) - emb[ctrl].mean(0), velocity[ctrl].mean(0)

    def r(a, b):
        return np.corrcoef(a, b)[0, 1]

    print(f"training types {train_types}, held-out {test_types}; mean Pearson r over groups (embedding)")
    for name, key in (("scvelo", "velocity_X_state"), ("true", "true_velocity_X_state")):
        train, test = list(groups(train_types, adata.obsm[key])), list(groups(test_types, adata.obsm[key]))
        resid = np.concatenate([real - shift for real, _ in train])
        vel = np.concatenate([v for _, v in train])
        alpha = float(resid @ vel / (vel @ vel))
        for label, gs in (("train", train), ("test", test)):
            base = np.mean([r(shift, real) for real, _ in gs])
            plus = np.mean([r(shift + alpha * v, real) for real, v in gs])
            print(f"{name:6s} velocity, {label:5s}: mean_shift {base:.3f}   + {alpha:.3g} x velocity {plus:.3f}")

    genes = adata.layers["log1p"]
    rows = np.isin(ct, train_types)
    e = emb[rows].astype(np.float64)
    x = genes[rows].toarray().astype(np.float64)
    e_c = e - e.mean(0)
    slope = np.linalg.solve(e_c.T @ e_c + 0.01 * len(e) * np.eye(e.shape[1]), e_c.T @ (x - x.mean(0)))  # [D, G]
    gene_shift = np.mean([np.asarray(genes[(ct == c) & (cond == "Burn")].mean(0) - genes[(ct == c) & (cond == "Sham")]
                                     .mean(0)).ravel() for c in train_types], axis=0)
    velocity = adata.obsm["velocity_X_state"]
    train = list(groups(train_types, velocity))
    resid = np.concatenate([real - shift for real, _ in train])
    vel = np.concatenate([v for _, v in train])
    alpha = float(resid @ vel / (vel @ vel))
    print("gene space (log1p), scvelo velocity, held-out types: mean Pearson r over groups")
    scores = []
    for c in test_types:
        for m in sorted(set(mouse[(ct == c) & (cond == "Burn")])):
            g = (ct == c) & (cond == "Burn") & (mouse == m)
            ctrl = (ct == c) & (cond == "Sham") & (day == day[g][0])
            real = np.asarray(genes[g].mean(0) - genes[ctrl].mean(0)).ravel()
            v = velocity[ctrl].mean(0)
            scores.append([r(gene_shift, real), r(shift @ slope, real), r((shift + alpha * v) @ slope, real)])
    direct, read, plus = np.mean(scores, axis=0)
    print(f"  mean_shift of the genes {direct:.3f}   mean_shift read out {read:.3f}   "
          f"+ {alpha:.3g} x velocity, read out {plus:.3f}")


if __name__ == "__main__":
    main()
