"""The whole study on the embedded default, stage by stage — what `make demo` runs.

make-data -> pretrain the base (source domain) -> RNA velocity -> train_all_variants.ipynb (papermill), once per
setting (unseen cell types, unseen mice) -> compare_results.ipynb (papermill), which scores the test split once. A stage whose output already exists is skipped (delete it to redo), so
re-running after an interruption continues where it stopped. Each stage's wall time is printed at the end.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from stlib.constants import KERNEL_NAME
from stlib.notebook import export_html, find_repo_root
from stlib.train.freshness import newer_inputs
from stlib.train_scripts import move_aside

DATA_DIR = Path("data")
RESULTS = Path("results")
RUNS = RESULTS / "runs"
EXECUTED = RESULTS / "executed"
LOGS = Path("logs")
# setting -> split TOML: the two questions the study answers (docs/protocol.md)
SETTINGS = {"unseen_cell_type": DATA_DIR / "wound_healing.toml", "unseen_mouse": DATA_DIR / "wound_healing_mice.toml"}
FIGURES = ("metrics_intervals.png", "metrics_heatmap.png",
           *(f"{stem}_{setting}.png" for setting in SETTINGS
             for stem in ("loss_curves_comparison", "grad_norm_comparison", "umap_comparison_all_models")))
TABLES = ("metrics_summary.csv", "metrics_vs_baselines.csv", "metrics_per_celltype.csv", "metrics_per_group.csv",
          *(f"training_dynamics_{setting}.csv" for setting in SETTINGS))


def _banner(text: str) -> None:
    print(f"\n{'=' * 100}\n[stlib demo] {text}\n{'=' * 100}", flush=True)


def _stlib(args: list[str], log: Path) -> None:
    """Run `python -m stlib ...` through tee into a log, failing loudly."""
    from stlib.train_scripts import run_teed

    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "stlib", *args])
    code, tail = run_teed(command, log)
    if code:
        raise RuntimeError(f"`stlib {' '.join(args)}` failed (exit {code}); see {log}:\n" + "\n".join(tail))


def execute_notebook(name: str, parameters: dict, out_name: str | None = None) -> Path:
    """Run notebooks/<name>.ipynb with papermill into results/executed/ (kept for reading afterwards)."""
    import papermill as pm

    EXECUTED.mkdir(parents=True, exist_ok=True)
    out = EXECUTED / f"{out_name or name}.ipynb"
    pm.execute_notebook(f"notebooks/{name}.ipynb", str(out), parameters=parameters, kernel_name=KERNEL_NAME,
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

    stage("make-data", all(p.exists() for p in (*SETTINGS.values(), DATA_DIR / "source_perturbations.toml")),
          make_data)
    changed = newer_inputs(RUNS / "base")
    if changed:  # pretrained on data since remade: a fresh base, the old one kept aside
        print(f"[stlib demo] {', '.join(map(str, changed))} changed after the base trained: the old base moved to "
              f"{move_aside(RUNS / 'base')}", flush=True)
    base_done = (RUNS / "base" / "checkpoints" / "final.ckpt").exists()
    stage("pretrain base on the source domain", base_done,
          lambda: _stlib(["pretrain", "--config", "configs/pretrain.yaml"], LOGS / "base_pretraining.log"))
    stage("RNA velocity (scvelo) in the model's space", False,
          lambda: _stlib(["velocity", str(DATA_DIR / "wound_healing.h5ad"), "--embed-key", "X_state",
                          "--pert-col", "condition", "--control-pert", "Sham"],
                         LOGS / "velocity.log"))
    for setting, toml in SETTINGS.items():
        params = {"run_mode": "sequential", "data_toml": str(toml), "output_root": str(RUNS / setting),
                  "scripts_dir": f"train_scripts/{setting}", "logs_dir": str(LOGS / setting)}
        params |= {"max_steps": max_steps} if max_steps else {}
        stage(f"train_all_variants.ipynb, {setting} (papermill)", False,
              lambda p=params, s=setting: execute_notebook("train_all_variants", p, f"train_all_variants_{s}"))
    stage("compare_results.ipynb (papermill)", False,
          lambda: export_html(execute_notebook("compare_results", {"settings": list(SETTINGS)}),
                              RESULTS / "compare_results.html"))

    _banner("done")
    width = max(len(k) for k in times)
    for name, seconds in times.items():
        print(f"  {name:<{width}}  {seconds:7.1f} s")
    print(f"  {'total':<{width}}  {sum(times.values()):7.1f} s")
    print("\nFigures:  " + "\n          ".join(str(RESULTS / f) for f in FIGURES if (RESULTS / f).exists()))
    print("Tables:   " + "\n          ".join(str(RESULTS / f) for f in TABLES if (RESULTS / f).exists()))
    print(f"Report:   {RESULTS / 'compare_results.html'} (open in a browser)")
    print(f"Notebooks executed: {EXECUTED}/   Logs: {LOGS}/   TensorBoard: tensorboard --logdir {RUNS}")
    return times
