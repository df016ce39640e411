"""Loader throughput of PerturbationDataModule: sets/s per training step on 10k cells x 64-d (CPU).

A printed table, not a test. Data: 10,000 cells, 64-d embedding, 4 cell types x 3 perturbations x 4 mice
(2 days), optional 2,000-gene log1p layer. Times setup() (load + validate + group) and then the train loader
(random sets, sampling groups by size) and the val loader (precomputed deterministic sets), median over
repeats of `--steps` batches each.

    python benchmarks/bench_datamodule.py [--cells 10000] [--dim 64] [--set-len 64] [--batch 8 32] [--genes 0 2000]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from stlib.config import DataConfig
from stlib.data.datamodule import PerturbationDataModule


def make_data(folder: Path, n_cells: int, dim: int, n_genes: int) -> Path:
    rng = np.random.default_rng(0)
    combos = list(itertools.product(["A", "B", "C", "D"], ["Sham", "Burn", "Other"], [("m1", 10), ("m2", 10),
                                                                                       ("m3", 14), ("m4", 14)]))
    pick = rng.integers(len(combos), size=n_cells)
    obs = pd.DataFrame([{"cell_type": combos[i][0], "condition": combos[i][1], "mouse_id": combos[i][2][0],
                         "day": combos[i][2][1]} for i in pick])
    obs.index = [f"c{i}" for i in range(n_cells)]
    adata = ad.AnnData(X=np.zeros((n_cells, max(n_genes, 1)), np.float32), obs=obs)
    adata.obsm["X_state"] = rng.normal(size=(n_cells, dim)).astype(np.float32)
    if n_genes:
        adata.layers["log1p"] = rng.random((n_cells, n_genes), dtype=np.float32)
    adata.write_h5ad(folder / "bench.h5ad")
    toml = folder / "bench.toml"
    toml.write_text('[datasets]\nbench = "bench.h5ad"\n[training]\nbench = "train"\n'
                    '[fewshot."bench.D"]\nval = ["Burn"]\ntest = ["Other"]\n')
    return toml


def time_loader(loader, steps: int, repeats: int) -> list[float]:
    """Seconds per batch for `repeats` runs of `steps` batches each."""
    out = []
    it = iter(loader)
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            try:
                next(it)
            except StopIteration:
                it = iter(loader)
                next(it)
        out.append((time.perf_counter() - start) / steps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--set-len", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--genes", type=int, nargs="+", default=[0, 2000])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    print(f"{args.cells} cells x {args.dim}-d, S={args.set_len}; median (min-max) over {args.repeats} x "
          f"{args.steps} batches")
    print(f"{'genes':>6} {'B':>4} {'setup s':>8} {'train ms/step':>16} {'train sets/s':>13} {'val sets/s':>11}")
    for n_genes in args.genes:
        with tempfile.TemporaryDirectory() as tmp:
            toml = make_data(Path(tmp), args.cells, args.dim, n_genes)
            cfg = DataConfig(toml_config_path=str(toml), embed_key="X_state", pert_col="condition",
                             control_pert="Sham", cell_type_key="cell_type", batch_col="mouse_id", time_col="day",
                             output_space="gene" if n_genes else "embedding", gene_layer="log1p", sets_per_group=64)
            for batch in args.batch:
                dm = PerturbationDataModule(cfg, args.set_len, batch, seed=0)
                start = time.perf_counter()
                dm.setup()
                setup_s = time.perf_counter() - start
                train = time_loader(dm.train_dataloader(), args.steps, args.repeats)
                val = time_loader(dm.val_dataloader(), min(args.steps, len(dm.val_dataloader())), args.repeats)
                med = statistics.median(train)
                print(f"{n_genes:>6} {batch:>4} {setup_s:>8.2f} "
                      f"{med * 1e3:>6.2f} ({min(train) * 1e3:.2f}-{max(train) * 1e3:.2f}) "
                      f"{batch / med:>13.0f} {batch / statistics.median(val):>11.0f}")


if __name__ == "__main__":
    main()
