"""How much room a model has over the mean-shift baseline on held-out cell types, from the simulation's truth.

The embedded default stores each cell type's true mean Burn − Sham effect per day (``uns["ground_truth"]``,
log1p gene space, no batch effects or sampling noise). For each held-out cell type and day this prints the
Pearson r of its true effect with
  * the noise-free training mean shift (mean of the training cell types' true effects) — the mean-shift
    baseline with infinitely many cells;
  * the same shift with the training cell types' own marker and trajectory genes zeroed — the most a model
    could gain by knowing that those genes do not respond in a new cell type;
  * the shared inflammation program alone.
The gap between the first column and 1 is what only the held-out type's own trajectory response explains,
which no training example shows.

    .venv/bin/python analysis/headroom.py [--data data/wound_healing.h5ad]
"""

from __future__ import annotations

import argparse

import anndata as ad
import numpy as np

from stlib.data.synthetic import ZEROSHOT, make_gene_programs
from stlib.evaluate.metrics import pearson


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/wound_healing.h5ad")
    args = parser.parse_args()
    truth = ad.read_h5ad(args.data, backed="r").uns["ground_truth"]
    effect = np.asarray(truth["effect_log1p"])  # [C, T, G]
    cell_types = [str(c) for c in truth["cell_types"]]
    days = [int(d) for d in truth["days"]]
    programs = make_gene_programs(effect.shape[-1], 0).programs
    train = [c for c in cell_types if c not in ZEROSHOT]
    mean_shift = effect[[cell_types.index(c) for c in train]].mean(axis=(0, 1))
    own_genes = np.zeros(effect.shape[-1], dtype=bool)
    for c in train:
        own_genes[programs[f"trajectory_{c}"]] = own_genes[programs[f"marker_{c}"]] = True
    inflammation = np.zeros(effect.shape[-1], dtype=bool)
    inflammation[programs["inflammation"]] = True
    print(f"training cell types: {', '.join(train)}; gene space (log1p), Pearson r with the true effect")
    print(f"{'cell type':<12} {'split':<5} {'day':>4} {'mean shift':>11} {'w/o train-own genes':>20} {'inflammation':>13}")
    for c, split in ZEROSHOT.items():
        for t, day in enumerate(days):
            e = effect[cell_types.index(c), t]
            print(f"{c:<12} {split:<5} {day:>4} {pearson(e, mean_shift):>11.3f} "
                  f"{pearson(e, np.where(own_genes, 0.0, mean_shift)):>20.3f} "
                  f"{pearson(e, np.where(inflammation, e, 0.0)):>13.3f}")


if __name__ == "__main__":
    main()
