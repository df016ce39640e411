"""How close is scvelo's velocity to the simulation's true velocity? (embedding, per cell)

Cosine of each cell's scvelo velocity (``obsm["velocity_X_state"]``, what `stlib velocity` writes) with its true
velocity (``obsm["true_velocity_X_state"]``, what make-data stores): the mean, over confident cells
(``velocity_confidence`` > 0.5), confidence-weighted, and per cell type.

    .venv/bin/python analysis/velocity_accuracy.py [--data data/wound_healing.h5ad]   (after `make demo`)
"""

from __future__ import annotations

import argparse

import anndata as ad
import numpy as np
from study import DATA

from stlib.data.synthetic import EMBED_KEY, TRUE_VELOCITY_KEY
from stlib.data.velocity import CONFIDENCE_KEY, velocity_key
from stlib.evaluate.metrics import direction_cosine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA), help="data with scvelo's and the true velocity")
    parser.add_argument("--cell-type-key", default="cell_types_simple_short")
    args = parser.parse_args()
    adata = ad.read_h5ad(args.data)
    v, truth = adata.obsm[velocity_key(EMBED_KEY)], adata.obsm[TRUE_VELOCITY_KEY]
    cos = np.array([direction_cosine(a, b) for a, b in zip(v, truth)])
    conf = adata.obs[CONFIDENCE_KEY].to_numpy()
    print(f"cosine(scvelo, truth) over {len(cos)} cells: mean {np.nanmean(cos):.3f}, confidence>0.5 "
          f"{np.nanmean(cos[conf > 0.5]):.3f} ({(conf > 0.5).mean():.1%} of cells), confidence-weighted "
          f"{np.nansum(cos * conf) / conf.sum():.3f}")
    cell_type = adata.obs[args.cell_type_key].astype(str).to_numpy()
    for ct in sorted(set(cell_type)):
        print(f"  {ct:13s} {np.nanmean(cos[cell_type == ct]):.3f}")


if __name__ == "__main__":
    main()
