"""What the two notebooks call: each notebook cell is one of these functions and a display.

`train_all_variants.ipynb`: :func:`training_overrides` -> :func:`stlib.train_scripts.plan_scripts` ->
:func:`stlib.train_scripts.run_scripts`. `compare_results.ipynb`: :func:`predict_study` -> :func:`evaluate_study`
-> :func:`baseline_comparison` -> :func:`load_all_scalars` -> the figure functions, each saving a PNG into
`results/`. A study has one or more settings (unseen cell types, unseen mice), each trained under
`results/runs/<setting>/`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from stlib.errors import ConfigError

MARKER = Path("configs") / "variants"
# tqdm.auto (imported by scanpy's dependencies) asks for ipywidgets in every kernel; its bars are not ours
warnings.filterwarnings("ignore", message="IProgress not found")


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


def predict_study(variants: Sequence[str], settings: Sequence[str], runs_root: str | Path = "results/runs",
                  out_dir: str | Path = "results/predictions", split: str = "test") -> dict[str, dict[str, Path]]:
    """:func:`predict_all` for each setting trained under ``<runs_root>/<setting>/``; absent settings are reported."""
    out = {}
    for setting in settings:
        if not (Path(runs_root) / setting).is_dir():
            print(f"[stlib] setting {setting}: nothing trained under {Path(runs_root) / setting} — not compared")
            continue
        out[setting] = predict_all(variants, Path(runs_root) / setting, Path(out_dir) / setting, split)
    if not any(out.values()):
        raise ConfigError(f"no trained variant under {runs_root}/<setting>/ for settings {list(settings)}")
    return out


def evaluate_study(preds: dict[str, dict[str, Path]], results_dir: str | Path = "results"
                   ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Every model and baseline of every setting -> (summary with 95 % intervals, per cell type, per group),
    written as metrics_summary.csv, metrics_per_celltype.csv and metrics_per_group.csv."""
    from stlib.evaluate.metrics import evaluate_groups, summarise_groups

    groups = pd.concat([evaluate_groups(list(paths.values())).assign(setting=setting)
                        for setting, paths in preds.items() if paths], ignore_index=True)
    summary, per_celltype = summarise_groups(groups)
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    summary.to_csv(results / "metrics_summary.csv", index=False)
    per_celltype.to_csv(results / "metrics_per_celltype.csv", index=False)
    groups.to_csv(results / "metrics_per_group.csv", index=False)
    return summary, per_celltype, groups


def evaluate_all(pred_paths: dict[str, Path], results_dir: str | Path = "results") -> tuple[pd.DataFrame, pd.DataFrame]:
    """One setting's models and the baselines -> metrics_summary.csv + metrics_per_celltype.csv."""
    from stlib.evaluate.metrics import evaluate_files, write_metrics

    summary, per_celltype = evaluate_files(list(pred_paths.values()))
    write_metrics(summary, per_celltype, Path(results_dir) / "metrics_summary.csv")
    return summary, per_celltype


def baseline_comparison(groups: pd.DataFrame, results_dir: str | Path | None = "results",
                        metrics: Sequence[str] = ("gene_correlation", "emb_gene_correlation", "de_overlap_50",
                                                  "mse")) -> pd.DataFrame:
    """Each model against the best baseline of its setting, per metric: paired difference over the held-out
    groups with its 95 % interval and per-group wins/losses -> metrics_vs_baselines.csv."""
    from stlib.evaluate.baselines import BASELINES
    from stlib.evaluate.intervals import paired_difference
    from stlib.evaluate.metrics import HIGHER_IS_BETTER

    rows = []
    for setting, table in groups.groupby("setting", sort=False):
        wide = {m: table.pivot_table(index="group_id", columns="model", values=m, dropna=False)
                for m in metrics if m in table and table[m].notna().any()}
        models = [m for m in pd.unique(table["model"]) if m not in BASELINES]
        for metric, values in wide.items():
            sign = 1.0 if HIGHER_IS_BETTER.get(metric, True) else -1.0
            present = [b for b in BASELINES if b in values and values[b].notna().any()]
            if not present:
                continue
            best = max(present, key=lambda b: sign * values[b].mean())
            for model in models:
                both = values[[model, best]].dropna()  # groups both score (celltype_time_shift may skip some)
                result = paired_difference(sign * both[model], sign * both[best])
                rows.append({"setting": setting, "model": model, "metric": metric, "best_baseline": best,
                             "better_by": result["diff"], "better_by_lo": result["diff_lo"],
                             "better_by_hi": result["diff_hi"], "wins": result["wins"], "losses": result["losses"],
                             "n_groups": result["n_groups"]})
    out = pd.DataFrame(rows)
    if results_dir is not None:
        out.to_csv(Path(results_dir) / "metrics_vs_baselines.csv", index=False)
    return out


def tensorboard(logdir: str | Path = "results/runs", port: int | None = None):
    """TensorBoard on `logdir` inside the notebook (tensorboard's notebook extension), from this kernel's venv.

    Why not bare `%tensorboard`: it runs `tensorboard` from PATH, and a kernel started from the project's
    kernelspec does not have the venv's bin/ on PATH, so JupyterLab would show "Could not find tensorboard"."""
    import sys

    from tensorboard import notebook as tb_notebook

    binary = Path(sys.executable).with_name("tensorboard")
    if binary.exists():
        os.environ.setdefault("TENSORBOARD_BINARY", str(binary))
    tb_notebook.start(f"--logdir {Path(logdir)}" + (f" --port {int(port)}" if port else ""))


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
                            results_dir: str | Path = "results", setting: str | None = None) -> pd.DataFrame:
    """Loss and gradient-norm statistics per run -> training_dynamics[_<setting>].csv."""
    from stlib.evaluate.tensorboard import training_dynamics

    table = training_dynamics({v: Path(runs_root) / v for v in variants if (Path(runs_root) / v).is_dir()})
    Path(results_dir).mkdir(parents=True, exist_ok=True)
    table.to_csv(Path(results_dir) / (f"training_dynamics_{setting}.csv" if setting else "training_dynamics.csv"),
                 index=False)
    return table


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _name(stem: str, setting: str | None) -> str:
    return f"{stem}_{setting}.png" if setting else f"{stem}.png"


def loss_curves_figure(scalars: dict[str, pd.DataFrame], results_dir: str | Path = "results",
                       setting: str | None = None):
    from stlib.evaluate.plots import plot_loss_curves

    fig = plot_loss_curves(scalars)
    if setting:
        fig.suptitle(setting)
    save_figure(fig, Path(results_dir) / _name("loss_curves_comparison", setting))
    return fig


def grad_norm_figure(scalars: dict[str, pd.DataFrame], results_dir: str | Path = "results",
                     setting: str | None = None):
    from stlib.evaluate.plots import plot_grad_norms

    fig = plot_grad_norms(scalars)
    if setting:
        fig.suptitle(setting)
    save_figure(fig, Path(results_dir) / _name("grad_norm_comparison", setting))
    return fig


def umap_figure(pred_paths: dict[str, Path], results_dir: str | Path = "results", setting: str | None = None):
    """One shared UMAP: real Sham, real Burn and every model's predicted Burn."""
    import anndata as ad

    from stlib.evaluate.plots import plot_umap_comparison

    first = next(iter(pred_paths.values()))
    real = ad.read_h5ad(str(first).replace("_pred.h5ad", "_real.h5ad"))
    preds = {name: ad.read_h5ad(path) for name, path in pred_paths.items()}
    fig = plot_umap_comparison(real, preds)
    if setting:
        fig.suptitle(setting)
    save_figure(fig, Path(results_dir) / _name("umap_comparison_all_models", setting))
    return fig


def metrics_heatmap_figure(summary: pd.DataFrame, per_celltype: pd.DataFrame | None = None,
                           results_dir: str | Path = "results"):
    from stlib.evaluate.plots import plot_metrics_heatmap

    fig = plot_metrics_heatmap(summary, per_celltype)
    save_figure(fig, Path(results_dir) / "metrics_heatmap.png")
    return fig


def metrics_intervals_figure(summary: pd.DataFrame, results_dir: str | Path = "results"):
    from stlib.evaluate.plots import plot_metric_intervals

    fig = plot_metric_intervals(summary)
    save_figure(fig, Path(results_dir) / "metrics_intervals.png")
    return fig


def export_html(executed: str | Path, out: str | Path) -> Path:
    """An executed notebook as a self-contained HTML report (figures embedded, code hidden) for collaborators."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(str(executed), as_version=4))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(body, encoding="utf-8")
    return out
