"""What the two notebooks call: each notebook cell is one of these functions and a display.

`train_all_variants.ipynb`: :func:`training_overrides` -> :func:`stlib.train_scripts.plan_scripts` ->
:func:`stlib.train_scripts.run_scripts`. `compare_results.ipynb`: :func:`predict_all` -> :func:`evaluate_all` ->
:func:`load_all_scalars` -> the figure functions, each saving a PNG into `results/`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from stlib.errors import ConfigError

MARKER = Path("configs") / "variants"


def find_repo_root(start: str | Path | None = None) -> Path:
    """The folder holding configs/variants, searched upward from `start` (notebooks run from notebooks/)."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / MARKER).is_dir():
            return folder
    raise ConfigError(f"no {MARKER} above {here}: run from inside the stlib repository")


def training_overrides(data_toml: str | None = None, base_checkpoint: str | None = None,
                       max_steps: int | None = None, batch_size: int | None = None, lr: float | None = None,
                       devices: str | int | None = None, output_root: str | None = None,
                       seed: int | None = None, extra: Sequence[str] = ()) -> list[str]:
    """Notebook parameters -> dot-list overrides shared by every variant script (None = keep the config's)."""
    pairs = {
        "data.toml_config_path": data_toml, "model.init_from": base_checkpoint, "training.max_steps": max_steps,
        "training.batch_size": batch_size, "training.lr": lr, "training.devices": devices,
        "output_dir": output_root, "training.seed": seed,
    }
    return [f"{k}={v}" for k, v in pairs.items() if v is not None] + list(extra)


def run_dirs(variants: Sequence[str], runs_root: str | Path) -> dict[str, Path]:
    return {v: Path(runs_root) / v for v in variants if (Path(runs_root) / v / "checkpoints" / "final.ckpt").exists()}


def predict_all(variants: Sequence[str], runs_root: str | Path = "results/runs",
                out_dir: str | Path = "results/predictions", split: str = "test") -> dict[str, Path]:
    """`stlib predict` for every trained variant (each model loaded once, the data read once for all that share
    it); a variant without final.ckpt is reported and skipped."""
    from stlib.evaluate.predict import predict_run

    found = run_dirs(variants, runs_root)
    for missing in sorted(set(variants) - set(found)):
        print(f"[stlib] {missing}: no {Path(runs_root) / missing / 'checkpoints/final.ckpt'} — not compared")
    cache: dict = {}
    return {name: predict_run(run_dir, split=split, out_dir=out_dir, data_cache=cache)[0]
            for name, run_dir in found.items()}


def evaluate_all(pred_paths: dict[str, Path], results_dir: str | Path = "results") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Metrics for every model and the two baselines -> metrics_summary.csv + metrics_per_celltype.csv."""
    from stlib.evaluate.metrics import evaluate_files, write_metrics

    summary, per_celltype = evaluate_files(list(pred_paths.values()))
    write_metrics(summary, per_celltype, Path(results_dir) / "metrics_summary.csv")
    return summary, per_celltype


def load_all_scalars(variants: Sequence[str], runs_root: str | Path = "results/runs") -> dict[str, pd.DataFrame]:
    """TensorBoard scalars of every run that has event files (read with tensorboard's own reader)."""
    from stlib.evaluate.tensorboard import read_scalars

    out = {}
    for variant in variants:
        run_dir = Path(runs_root) / variant
        if run_dir.is_dir():
            frame = read_scalars(run_dir)
            if len(frame):
                out[variant] = frame
    return out


def training_dynamics_table(variants: Sequence[str], runs_root: str | Path = "results/runs",
                            results_dir: str | Path = "results") -> pd.DataFrame:
    from stlib.evaluate.tensorboard import training_dynamics

    table = training_dynamics({v: Path(runs_root) / v for v in variants if (Path(runs_root) / v).is_dir()})
    Path(results_dir).mkdir(parents=True, exist_ok=True)
    table.to_csv(Path(results_dir) / "training_dynamics.csv", index=False)
    return table


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def loss_curves_figure(scalars: dict[str, pd.DataFrame], results_dir: str | Path = "results"):
    from stlib.evaluate.plots import plot_loss_curves

    fig = plot_loss_curves(scalars)
    save_figure(fig, Path(results_dir) / "loss_curves_comparison.png")
    return fig


def grad_norm_figure(scalars: dict[str, pd.DataFrame], results_dir: str | Path = "results"):
    from stlib.evaluate.plots import plot_grad_norms

    fig = plot_grad_norms(scalars)
    save_figure(fig, Path(results_dir) / "grad_norm_comparison.png")
    return fig


def umap_figure(pred_paths: dict[str, Path], results_dir: str | Path = "results"):
    """One shared UMAP: real Sham, real Burn and every model's predicted Burn."""
    import anndata as ad

    from stlib.evaluate.plots import plot_umap_comparison

    first = next(iter(pred_paths.values()))
    real = ad.read_h5ad(str(first).replace("_pred.h5ad", "_real.h5ad"))
    preds = {name: ad.read_h5ad(path) for name, path in pred_paths.items()}
    fig = plot_umap_comparison(real, preds)
    save_figure(fig, Path(results_dir) / "umap_comparison_all_models.png")
    return fig


def metrics_heatmap_figure(summary: pd.DataFrame, per_celltype: pd.DataFrame | None = None,
                           results_dir: str | Path = "results"):
    from stlib.evaluate.plots import plot_metrics_heatmap

    fig = plot_metrics_heatmap(summary, per_celltype)
    save_figure(fig, Path(results_dir) / "metrics_heatmap.png")
    return fig
