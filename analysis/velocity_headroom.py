"""Does RNA velocity carry what the mean-shift baseline lacks on held-out cell types?

Embedding: for every Burn group (see study.py) the real shift is compared with the baseline (the training mean
shift) and with the baseline + alpha x the mean velocity of the group's controls, alpha fitted by least squares on
the training types' groups; with scvelo's velocity and with the simulation's true velocity. Exact group means, no
sampling of control sets. Genes: the baseline is the genes' own training mean shift; the candidate is read out
from the embedding by the ridge readout a new gene decoder starts from (penalty 0.01 per cell): what an embedding
model with velocity can reach in genes.

    .venv/bin/python analysis/velocity_headroom.py [--data data/wound_healing.h5ad]   (after `make demo`)
"""

from __future__ import annotations

import argparse

import anndata as ad
import numpy as np
from study import DATA, group_shift, load_study, perturbed_groups, train_mean_shift

from stlib.evaluate.layout import mean_rows
from stlib.evaluate.metrics import pearson
from stlib.linear import normal_equations, ridge_solve

VELOCITY_KEYS = {"scvelo": "velocity_X_state", "true": "true_velocity_X_state"}
RIDGE = 1e-2  # as model.decoder_skip_ridge


def shift_and_velocity(emb, velocity, groups) -> list[tuple[np.ndarray, np.ndarray]]:
    """(real shift, mean velocity of its controls) per group."""
    return [(group_shift(emb, g), mean_rows(velocity, g.basal_indices)) for g in groups]


def velocity_gain(pairs, shift: np.ndarray) -> float:
    """Least-squares alpha in real ≈ shift + alpha x velocity over all groups' coordinates."""
    resid = np.concatenate([real - shift for real, _ in pairs])
    vel = np.concatenate([v for _, v in pairs])
    return float(resid @ vel / (vel @ vel))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA), help="the wound data with velocity; its split TOML beside it")
    args = parser.parse_args()
    dm = load_study(args.data)
    emb, obsm = dm.store.embed, ad.read_h5ad(args.data).obsm  # the data module keeps only what training reads
    train_groups, test_groups = perturbed_groups(dm, "train"), perturbed_groups(dm, "test")
    shift = train_mean_shift(dm, emb)

    print(f"training types {sorted({g.cell_type for g in train_groups})}, held-out "
          f"{sorted({g.cell_type for g in test_groups})}; mean Pearson r over Burn groups (embedding)")
    print(f"{'velocity':8s} {'types':6s} {'mean_shift':>10s} {'alpha':>8s} {'+ alpha x velocity':>19s}")
    for name, key in VELOCITY_KEYS.items():
        train = shift_and_velocity(emb, obsm[key], train_groups)
        alpha = velocity_gain(train, shift)
        for label, pairs in (("train", train), ("test", shift_and_velocity(emb, obsm[key], test_groups))):
            base = np.mean([pearson(shift, real) for real, _ in pairs])
            plus = np.mean([pearson(shift + alpha * v, real) for real, v in pairs])
            print(f"{name:8s} {label:6s} {base:10.3f} {alpha:8.3g} {plus:19.3f}")

    genes, velocity = dm.store.genes, obsm[VELOCITY_KEYS["scvelo"]]
    slope, _ = ridge_solve(*normal_equations(dm.train_cell_chunks()), RIDGE)  # [D, G]
    gene_shift = train_mean_shift(dm, genes)
    alpha = velocity_gain(shift_and_velocity(emb, velocity, train_groups), shift)
    scores = [[pearson(gene_shift, real), pearson(shift @ slope, real), pearson((shift + alpha * v) @ slope, real)]
              for real, v in ((group_shift(genes, g), mean_rows(velocity, g.basal_indices)) for g in test_groups)]
    direct, read, plus = np.mean(scores, axis=0)
    print("\ngene space (log1p), scvelo velocity, held-out types: mean Pearson r over Burn groups")
    print(f"  mean_shift of the genes {direct:.3f}   mean_shift read out {read:.3f}   "
          f"+ {alpha:.3g} x velocity, read out {plus:.3f}")


if __name__ == "__main__":
    main()
