"""The whole study on the embedded default, stage by stage — what `make demo` runs.

make-data -> pretrain the base (source domain) -> RNA velocity -> train_all_variants.ipynb (papermill) ->
compare_results.ipynb (papermill). A stage whose output already exists is skipped (delete it to redo), so
re-running after an interruption continues where it stopped. Each stage's wall time is printed at the end.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from stlib.notebook import find_repo_root

DATA_DIR = Path("data")
RESULTS = Path("results")
RUNS = RESULTS / "runs"
EXECUTED = RESULTS / "executed"
LOGS = Path("logs")
FIGURES = ("loss_curves_comparison.png", "grad_norm_comparison.png", "umap_comparison_all_models.png",
           "metrics_heatmap.png")
TABLES = ("metrics_summary.csv", "metrics_per_celltype.csv", "training_dynamics.csv")


def _banner(text: str) -> None:
    print(f"\n{'=' * 100}\n[stlib demo] {text}\n{'=' * 100}", flush=True)


def _stlib(args: list[str], log: Path) -> None:
    """Run `python -m stlib ...` through tee into a log, failing loudly."""
    from stlib.train_scripts import run_teed

    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "stlib", *args])
    code, tail = run_teed(command, log)
    if code:
        raise RuntimeError(f"`stlib {' '.join(args)}` failed (exit {code}); see {log}:\n" + "\n".join(tail))


def execute_notebook(name: str, parameters: dict) -> Path:
    """Run notebooks/<name>.ipynb with papermill into results/executed/ (kept for reading afterwards)."""
    import papermill as pm

    EXECUTED.mkdir(parents=True, exist_ok=True)
    out = EXECUTED / f"{name}.ipynb"
    pm.execute_notebook(f"notebooks/{name}.ipynb", str(out), parameters=parameters, kernel_name="python3",
                        cwd="notebooks", log_output=True, progress_bar=False)
    return out


def run_demo(max_steps: int | None = None, root: str | Path = ".", seed: int = 0) -> dict[str, float]:
    os.chdir(find_repo_root(root))
    times: dict[str, float] = {}

    def stage(name: str, done: bool, action) -> None:
        _banner(f"{name}{' — already done, skipped' if done else ''}")
        started = time.time()
        if not done:
            action()
        times[name] = time.time() - started

    def make_data():
        from stlib.data.synthetic import write_default_data

        write_default_data(DATA_DIR, seed=seed)

    stage("make-data", (DATA_DIR / "wound_healing.toml").exists() and (DATA_DIR / "source_perturbations.toml").exists(),
          make_data)
    stage("pretrain base on the source domain", (RUNS / "base" / "checkpoints" / "final.ckpt").exists(),
          lambda: _stlib(["pretrain", "--config", "configs/pretrain.yaml"], LOGS / "base_pretraining.log"))
    stage("RNA velocity (scvelo) in the model's space", False,
          lambda: _stlib(["velocity", str(DATA_DIR / "wound_healing.h5ad"), "--embed-key", "X_state"],
                         LOGS / "velocity.log"))
    params = {"run_mode": "sequential"} | ({"max_steps": max_steps} if max_steps else {})
    stage("train_all_variants.ipynb (papermill)", False, lambda: execute_notebook("train_all_variants", params))
    stage("compare_results.ipynb (papermill)", False, lambda: execute_notebook("compare_results", {}))

    _banner("done")
    width = max(len(k) for k in times)
    for name, seconds in times.items():
        print(f"  {name:<{width}}  {seconds:7.1f} s")
    print(f"  {'total':<{width}}  {sum(times.values()):7.1f} s")
    print("\nFigures:  " + "\n          ".join(str(RESULTS / f) for f in FIGURES if (RESULTS / f).exists()))
    print("Tables:   " + "\n          ".join(str(RESULTS / f) for f in TABLES if (RESULTS / f).exists()))
    print(f"Notebooks executed: {EXECUTED}/   Logs: {LOGS}/   TensorBoard: tensorboard --logdir {RUNS}")
    return times
