"""Where `stlib velocity` spends its time and memory: wall seconds and peak RSS of each scanpy/scvelo step.

Wraps the library calls that :func:`stlib.data.velocity.run_velocity` makes, samples this process's RSS every
50 ms, and prints one row per call (a step's peak is the highest RSS seen while it ran).

    .venv/bin/python benchmarks/bench_velocity_steps.py STUDY.h5ad --embed-key X_hvg --pert-col condition \
        --control-pert Sham
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import threading
import time
from pathlib import Path

import psutil

STEPS = {  # module path -> function names wrapped there
    "scvelo.pp": ["filter_and_normalize", "moments"],
    "scvelo.tl": ["velocity", "velocity_graph", "velocity_confidence", "velocity_embedding"],
    "scanpy.pp": ["log1p", "highly_variable_genes", "pca", "neighbors"],
    "stlib.data.velocity": ["_read_inputs", "_write_outputs"],
}


class RssSampler(threading.Thread):
    """Highest RSS (GiB) since the last reset, sampled in the background."""

    def __init__(self, every_s: float = 0.05):
        super().__init__(daemon=True)
        self.process, self.every_s, self.peak = psutil.Process(), every_s, 0.0

    def run(self) -> None:
        while True:
            self.peak = max(self.peak, self.process.memory_info().rss / 2**30)
            time.sleep(self.every_s)

    def reset(self) -> float:
        peak, self.peak = self.peak, self.process.memory_info().rss / 2**30
        return peak


def wrap_steps(sampler: RssSampler, rows: list) -> None:
    import importlib

    for module_name, names in STEPS.items():
        module = importlib.import_module(module_name)
        for name in names:
            if not hasattr(module, name):
                continue
            original = getattr(module, name)

            @functools.wraps(original)
            def timed(*args, _original=original, _name=f"{module_name}.{name}", **kwargs):
                sampler.reset()
                started = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    rows.append((_name, time.perf_counter() - started, sampler.reset()))
                    print(f"{_name}: {rows[-1][1]:.1f} s, peak {rows[-1][2]:.2f} GiB", flush=True)

            setattr(module, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--embed-key", default="X_state")
    parser.add_argument("--pert-col")
    parser.add_argument("--control-pert")
    args = parser.parse_args()
    sampler = RssSampler()
    sampler.start()
    rows: list = []
    wrap_steps(sampler, rows)
    from stlib.data.velocity import run_velocity

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run_velocity(args.study, args.embed_key, Path(tmp) / "out.h5ad", pert_col=args.pert_col,
                     control_pert=args.control_pert, force=True)
    total = time.perf_counter() - started
    print("\n| step | wall (s) | peak RSS (GiB) |\n|---|---|---|")
    for name, wall, peak in rows:
        print(f"| {name} | {wall:.1f} | {peak:.2f} |")
    print(f"| whole run | {total:.1f} | {max(p for _, _, p in rows):.2f} |")


if __name__ == "__main__":
    main()
