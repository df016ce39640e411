"""Time the default data generator and the scvelo pipeline at the default size; cosine with the true velocity.

    .venv/bin/python benchmarks/bench_synthetic_velocity.py [--n-cells 6000] [--n-genes 1000]

Prints wall and CPU seconds (CPU time is the fairer number on a shared machine).
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-cells", type=int, default=6000)
    parser.add_argument("--n-genes", type=int, default=1000)
    args = parser.parse_args()

    import anndata as ad

    from stlib.data import synthetic as syn
    from stlib.data.velocity import run_velocity

    with tempfile.TemporaryDirectory() as tmp:
        paths, wall, cpu = _timed(lambda: syn.write_default_data(tmp, n_cells=args.n_cells, n_genes=args.n_genes))
        print(f"write_default_data {args.n_cells} x {args.n_genes} (+ source): wall {wall:.1f} s, cpu {cpu:.1f} s")
        out, wall, cpu = _timed(lambda: run_velocity(paths["wound_healing"], "X_state"))
        print(f"run_velocity (read + scvelo + write): wall {wall:.1f} s, cpu {cpu:.1f} s")
        _, wall, cpu = _timed(lambda: run_velocity(paths["wound_healing"], "X_state"))
        print(f"run_velocity cache hit: wall {wall:.2f} s")
        adata = ad.read_h5ad(Path(out))
    v, truth = adata.obsm["velocity_X_state"], adata.obsm["true_velocity_X_state"]
    cos = (v * truth).sum(1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(truth, axis=1) + 1e-12)
    conf = adata.obs["velocity_confidence"].to_numpy()
    print(
        f"cosine(scvelo, truth): mean {cos.mean():.3f}, confidence>0.5 {cos[conf > 0.5].mean():.3f} "
        f"({(conf > 0.5).mean():.1%} of cells), confidence-weighted {(cos * conf).sum() / conf.sum():.3f}"
    )
    for ct in adata.obs["cell_types_simple_short"].cat.categories:
        sel = (adata.obs["cell_types_simple_short"] == ct).to_numpy()
        print(f"  {ct:13s} {cos[sel].mean():.3f}")


if __name__ == "__main__":
    main()
