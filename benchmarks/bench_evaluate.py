"""Cost of the evaluation metrics at the study's scale (CPU): compute_metrics and the two baselines.

A printed table, not a test. Data: a test split of `--cells` cells in the layout `stlib predict` writes,
`--dim`-d X (the embedding itself, as for an embedding-space model), 6 cell types x 3 days x Sham/Burn
(Burn split over 2 mice -> 36 groups), prediction = real cells + noise. Times compute_metrics (per-group
energy distances on <= 500 cells per set dominate) and building each baseline, median of `--repeats`.

    python benchmarks/bench_evaluate.py [--cells 10000] [--dim 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import anndata as ad
import numpy as np
import pandas as pd
import torch

from stlib.evaluate.baselines import BASELINES
from stlib.evaluate.metrics import compute_metrics


def make_pair(n_cells: int, dim: int) -> tuple[ad.AnnData, ad.AnnData]:
    rng = np.random.default_rng(0)
    combos = list(itertools.product([f"ct{i}" for i in range(6)], [10, 14, 19], ["Sham", "Burn"], ["m1", "m2"]))
    pick = rng.integers(len(combos), size=n_cells)
    obs = pd.DataFrame([dict(zip(["cell_type", "day", "condition", "mouse_id"], combos[i])) for i in pick])
    obs["group_id"] = np.where(obs["condition"] == "Sham", "control",
                               obs["cell_type"] + "/" + obs["mouse_id"] + "@" + obs["day"].astype(str))
    obs["source_index"] = np.arange(n_cells)
    obs.index = [f"cell{i}" for i in range(n_cells)]
    x = rng.normal(size=(n_cells, dim)).astype(np.float32)
    x[(obs["condition"] == "Burn").to_numpy()] += 0.3
    uns = {"stlib": {"model": "bench", "embed_key": "X_state", "pert_col": "condition", "control_pert": "Sham",
                     "cell_type_key": "cell_type", "time_col": "day", "batch_col": "mouse_id", "space": "embedding",
                     "split": "test", "train_mean_shift_X": {"Burn": np.full(dim, 0.25, np.float32)},
                     "train_mean_shift_embedding": {"Burn": np.full(dim, 0.25, np.float32)}}}
    real = ad.AnnData(X=x, obs=obs, uns=uns)
    real.obsm["X_state"] = x
    pred = real.copy()
    burn = (obs["condition"] == "Burn").to_numpy()
    pred.X[burn] += 0.1 * rng.normal(size=(burn.sum(), dim)).astype(np.float32)
    return pred, real


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pred, real = make_pair(args.cells, args.dim)
    print(f"{args.cells} cells x {args.dim} dims, torch threads {torch.get_num_threads()}")
    print(f"{'step':<22}{'median s':>10}")
    print(f"{'compute_metrics':<22}{timed(lambda: compute_metrics(pred, real), args.repeats):>10.2f}")
    for name, make in BASELINES.items():
        print(f"{name + ' baseline':<22}{timed(lambda make=make: make(real), args.repeats):>10.2f}")


if __name__ == "__main__":
    main()
