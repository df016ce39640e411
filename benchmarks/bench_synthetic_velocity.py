"""Time the default data generator and the scvelo pipeline at the default size.

    .venv/bin/python benchmarks/bench_synthetic_velocity.py [--n-cells 6000] [--n-genes 1000]

Prints wall and CPU seconds (CPU time is the fairer number on a shared machine). How close scvelo's velocity comes
to the simulation's truth: analysis/velocity_accuracy.py.
"""

import argparse
import tempfile
import time


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-cells", type=int, default=6000)
    parser.add_argument("--n-genes", type=int, default=1000)
    args = parser.parse_args()

    from stlib.data import synthetic as syn
    from stlib.data.velocity import run_velocity

    with tempfile.TemporaryDirectory() as tmp:
        paths, wall, cpu = _timed(lambda: syn.write_default_data(tmp, n_cells=args.n_cells, n_genes=args.n_genes))
        print(f"write_default_data {args.n_cells} x {args.n_genes} (+ source): wall {wall:.1f} s, cpu {cpu:.1f} s")
        _, wall, cpu = _timed(lambda: run_velocity(paths["wound_healing"], "X_state"))
        print(f"run_velocity (read + scvelo + write): wall {wall:.1f} s, cpu {cpu:.1f} s")
        _, wall, cpu = _timed(lambda: run_velocity(paths["wound_healing"], "X_state"))
        print(f"run_velocity cache hit: wall {wall:.2f} s")


if __name__ == "__main__":
    main()
