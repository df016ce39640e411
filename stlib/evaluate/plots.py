"""Comparison figures: loss curves, gradient norms, one shared UMAP of all models, metric heatmaps.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot (no global figure state, safe
under the Agg backend and in loops); the caller saves it (``fig.savefig(path)``) or displays it.

The UMAP is computed once over real controls, real perturbed cells and every model's predicted
perturbed cells together (in ``obsm[embed_key]``; PCA to 50 dims first when wider), so all panels share
coordinates and can be compared by eye.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib import colormaps
from matplotlib.figure import Figure

from stlib.errors import listing
from stlib.evaluate.layout import EvalError, control_mask, read_settings, rows
from stlib.evaluate.metrics import HIGHER_IS_BETTER, OVERALL
from stlib.evaluate.tensorboard import GRAD_NORM, TRAIN_LOSS, VAL_LOSS, grad_spikes, series

SOURCE_KEY, KIND_KEY = "source", "kind"  # obs columns of the UMAP AnnData
REAL = "real"
GREY = "#d9d9d9"


def _colors(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def ema(values: np.ndarray, weight: float = 0.9) -> np.ndarray:
    """TensorBoard-style exponential moving average, debiased so the start is not pulled to 0."""
    out, acc = np.empty(len(values)), 0.0
    for i, v in enumerate(np.asarray(values, dtype=np.float64)):
        acc = weight * acc + (1 - weight) * v
        out[i] = acc / (1 - weight ** (i + 1))
    return out


# ----------------------------------------------------------------------------------- training curves


def plot_loss_curves(scalars: dict[str, pd.DataFrame], smoothing: float = 0.9, logy: bool = False) -> Figure:
    """Left: train loss (faint raw, solid smoothed) per model; right: validation loss per model."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax_train, ax_val = fig.subplots(1, 2)
    for (name, df), color in zip(scalars.items(), _colors(len(scalars))):
        train, val = series(df, TRAIN_LOSS), series(df, VAL_LOSS)
        if len(train):
            ax_train.plot(train["step"], train["value"], color=color, alpha=0.25, lw=0.8)
            ax_train.plot(train["step"], ema(train["value"].to_numpy(), smoothing), color=color, lw=1.6, label=name)
        if len(val):
            ax_val.plot(val["step"], val["value"], color=color, marker="o", ms=3, lw=1.4, label=name)
    for ax, title in ((ax_train, f"{TRAIN_LOSS} (EMA {smoothing})"), (ax_val, VAL_LOSS)):
        ax.set(title=title, xlabel="step", ylabel="loss", yscale="log" if logy else "linear")
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    return fig


def plot_grad_norms(scalars: dict[str, pd.DataFrame], window: int = 50) -> Figure:
    """Top: grad norm per model with spikes marked (count in the legend); bottom: its rolling std."""
    fig = Figure(figsize=(12, 6.5), layout="constrained")
    ax_norm, ax_std = fig.subplots(2, 1, sharex=True)
    for (name, df), color in zip(scalars.items(), _colors(len(scalars))):
        grad = series(df, GRAD_NORM)
        if not len(grad):
            continue
        spikes = grad_spikes(grad["value"], window=window)
        ax_norm.plot(grad["step"], grad["value"], color=color, lw=0.9, label=f"{name} ({spikes.sum()} spikes)")
        ax_norm.scatter(grad["step"][spikes], grad["value"][spikes], color=color, marker="x", s=40, zorder=3)
        rolling = grad["value"].rolling(window, min_periods=2).std()
        ax_std.plot(grad["step"], rolling, color=color, lw=1.2, label=name)
    ax_norm.set(title=f"{GRAD_NORM} (x = spike)", ylabel="grad norm", yscale="log")
    ax_std.set(title=f"rolling std over {window} logged steps", xlabel="step", ylabel="std")
    for ax in (ax_norm, ax_std):
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"{GRAD_NORM} not logged", ha="center", va="center", transform=ax.transAxes)
    return fig


# ----------------------------------------------------------------------------------- UMAP


def _embedding(adata: AnnData, key: str) -> np.ndarray | object:
    return adata.obsm[key] if key else adata.X


def umap_embedding(
    real: AnnData,
    preds: dict[str, AnnData],
    color_by: Sequence[str] = (),
    max_cells: int = 3000,
    seed: int = 0,
    n_neighbors: int = 15,
    **settings: str | None,
) -> AnnData:
    """Cells of every source in one AnnData with a shared ``obsm["X_umap"]``.

    obs: ``source`` ("real" or the model name), ``kind`` (control / perturbed / predicted), the
    perturbation column and the ``color_by`` columns. At most ``max_cells`` cells per (source, kind).
    """
    import scanpy as sc

    s = read_settings(real, **settings)
    key = s.embed_key if s.embed_key in real.obsm else ""
    columns = list(dict.fromkeys([s.pert_col, *color_by]))
    rng = np.random.default_rng(seed)
    blocks, obs = [], []

    def add(adata: AnnData, mask: np.ndarray, source: str, kind: str) -> None:
        missing = [c for c in columns if c not in adata.obs]
        if missing:
            raise EvalError(f"{source}: obs column(s) {listing(missing)} not found; obs has {listing(adata.obs)}")
        if key and key not in adata.obsm:
            raise EvalError(f"{source}: obsm[{key!r}] not found; obsm has {listing(adata.obsm.keys())}")
        idx = np.flatnonzero(mask)
        if len(idx) > max_cells:
            idx = np.sort(rng.choice(idx, max_cells, replace=False))
        blocks.append(rows(_embedding(adata, key), idx))
        part = pd.DataFrame({c: adata.obs[c].astype(str).to_numpy()[idx] for c in columns})
        part[SOURCE_KEY], part[KIND_KEY] = source, kind
        obs.append(part)

    ctrl = control_mask(real, s)
    add(real, ctrl, REAL, "control")
    add(real, ~ctrl, REAL, "perturbed")
    for name, pred in preds.items():
        add(pred, ~control_mask(pred, s), name, "predicted")
    dims = {b.shape[1] for b in blocks}
    if len(dims) > 1:
        raise EvalError(f"embeddings differ in width across sources: {sorted(dims)}")
    obs = pd.concat(obs, ignore_index=True)
    obs.index = [f"c{i}" for i in range(len(obs))]
    combined = AnnData(X=np.vstack(blocks).astype(np.float32), obs=obs)
    use_rep = "X"
    if combined.n_vars > 50:
        sc.pp.pca(combined, n_comps=min(50, combined.n_obs - 1), random_state=seed)
        use_rep = "X_pca"
    sc.pp.neighbors(combined, n_neighbors=min(n_neighbors, combined.n_obs - 1), use_rep=use_rep, random_state=seed)
    sc.tl.umap(combined, random_state=seed)
    combined.uns["umap_settings"] = {"pert_col": s.pert_col, "control_pert": s.control_pert}
    return combined


def _condition_labels(obs: pd.DataFrame, pert_col: str) -> np.ndarray:
    """'Sham', 'Burn (real)', 'Burn (predicted)': one palette for every panel."""
    kind = obs[KIND_KEY].to_numpy()
    pert = obs[pert_col].to_numpy().astype(object)
    return np.where(kind == "control", pert, pert + np.where(kind == "predicted", " (predicted)", " (real)"))


def plot_umap_comparison(
    real: AnnData,
    preds: dict[str, AnnData],
    color_by: Sequence[str] | None = None,
    max_cells: int = 3000,
    seed: int = 0,
    point_size: float = 4.0,
    **settings: str | None,
) -> Figure:
    """One column per model: real controls, real perturbed and that model's predicted perturbed cells on
    the shared UMAP (everything else grey). One row per ``color_by`` column; default: the perturbation
    column (real vs predicted told apart), then the cell type column.
    """
    s = read_settings(real, **settings)
    color_by = list(color_by) if color_by else [s.pert_col, s.cell_type_key]
    cells = umap_embedding(real, preds, color_by=color_by, max_cells=max_cells, seed=seed, **settings)
    xy = cells.obsm["X_umap"]
    obs = cells.obs
    names = list(preds) or [REAL]
    fig = Figure(figsize=(4.2 * len(names) + 2.2, 4.0 * len(color_by)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(color_by), len(names), squeeze=False))
    for r, column in enumerate(color_by):
        labels = _condition_labels(obs, s.pert_col) if column == s.pert_col else obs[column].to_numpy()
        cats = sorted(set(labels), key=lambda v: (v != s.control_pert, "(predicted)" in v, v))
        palette = dict(zip(cats, _colors(len(cats))))
        for c, name in enumerate(names):
            ax = axes[r, c]
            shown = (obs[SOURCE_KEY] == REAL).to_numpy() | (obs[SOURCE_KEY] == name).to_numpy()
            ax.scatter(*xy[~shown].T, s=point_size, c=GREY, lw=0, rasterized=True)
            for cat in cats:
                m = shown & (labels == cat)
                if m.any():
                    ax.scatter(*xy[m].T, s=point_size, color=palette[cat], lw=0, label=cat, rasterized=True)
            ax.set(xticks=[], yticks=[], title=f"{name} — {column}" if r == 0 else column)
            if c == len(names) - 1:
                ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=3, frameon=False)
    return fig


# ----------------------------------------------------------------------------------- metrics


def _annotated(ax, values: np.ndarray, colours: np.ndarray, row_labels, col_labels, cmap: str,
               intervals: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    ax.imshow(np.ma.masked_invalid(colours), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_facecolor(GREY)
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=35, ha="right")
    ax.set_yticks(range(len(row_labels)), row_labels)
    for (i, j), v in np.ndenumerate(values):
        text = "nan" if np.isnan(v) else f"{v:.3g}"
        if intervals is not None and np.isfinite(intervals[0][i, j]):
            text += f"\n[{intervals[0][i, j]:.2g}, {intervals[1][i, j]:.2g}]"
        ax.text(j, i, text, ha="center", va="center", fontsize=7 if intervals is not None else 8)


def _best_is_one(row: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Min-max scale a metric across models so 1 = best model, 0 = worst (NaN kept)."""
    finite = row[np.isfinite(row)]
    if not len(finite) or finite.max() == finite.min():
        return np.where(np.isnan(row), np.nan, 0.5)
    lo, hi = finite.min(), finite.max()
    scaled = (row - lo) / (hi - lo)
    return scaled if higher_is_better else 1 - scaled


def _settings(summary_df: pd.DataFrame) -> list:
    return list(pd.unique(summary_df["setting"])) if "setting" in summary_df else [None]


def plot_metrics_heatmap(
    summary_df: pd.DataFrame,
    per_celltype_df: pd.DataFrame | None = None,
    metric: str = "gene_correlation",
    metrics: Sequence[str] | None = None,
) -> Figure:
    """Per setting (row of panels), left: metric × model annotated with value and 95 % interval, coloured by rank
    within each metric (green = best). Right (with per_celltype_df): cell type × model for one ``metric``.
    """
    if "model" not in summary_df:
        raise EvalError(f"summary_df needs a 'model' column; has {listing(summary_df.columns)}")
    metrics = list(metrics) if metrics else [m for m in HIGHER_IS_BETTER if m in summary_df]
    unknown = [m for m in metrics if m not in summary_df]
    if unknown:
        raise EvalError(f"metric(s) {listing(unknown)} not in summary_df; has {listing(summary_df.columns)}")
    if per_celltype_df is not None and metric not in per_celltype_df:
        raise EvalError(f"metric {metric!r} not in per_celltype_df; has {listing(per_celltype_df.columns)}")
    settings = _settings(summary_df)
    panels = 2 if per_celltype_df is not None else 1
    n_models = summary_df.groupby("setting").size().max() if "setting" in summary_df else len(summary_df)
    fig = Figure(figsize=(1.25 * n_models * panels + 4, (0.6 * len(metrics) + 2.5) * len(settings)),
                 layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(settings), panels, squeeze=False))
    for r, setting in enumerate(settings):
        summary = summary_df if setting is None else summary_df[summary_df["setting"] == setting]
        models = list(summary["model"])
        table = summary.set_index("model")
        values = table[metrics].T.to_numpy(dtype=np.float64)
        bounds = None
        if all(f"{m}_lo" in table for m in metrics):
            bounds = tuple(table[[f"{m}_{b}" for m in metrics]].T.to_numpy(dtype=np.float64) for b in ("lo", "hi"))
        colours = np.vstack([_best_is_one(v, HIGHER_IS_BETTER.get(m, True)) for v, m in zip(values, metrics)])
        _annotated(axes[r, 0], values, colours, metrics, models, "RdYlGn", bounds)
        title = "metrics [95 % interval over held-out groups] (colour: rank among models)"
        axes[r, 0].set_title(title if setting is None else f"{setting}: {title}")
        if per_celltype_df is not None:
            per_ct = per_celltype_df if setting is None or "setting" not in per_celltype_df else \
                per_celltype_df[per_celltype_df["setting"] == setting]
            pivot = per_ct.pivot_table(index="cell_type", columns="model", values=metric, dropna=False)
            pivot = pivot.reindex(columns=[m for m in models if m in pivot.columns])
            order = [c for c in pivot.index if c != OVERALL] + ([OVERALL] if OVERALL in pivot.index else [])
            pivot = pivot.loc[order]
            vals = pivot.to_numpy(dtype=np.float64)
            cols = np.vstack([_best_is_one(v, HIGHER_IS_BETTER.get(metric, True)) for v in vals])
            _annotated(axes[r, 1], vals, cols, list(pivot.index), list(pivot.columns), "RdYlGn")
            axes[r, 1].set_title(f"{metric} per cell type")
    return fig


FOREST_METRICS = ("gene_correlation", "emb_gene_correlation", "de_overlap_50", "mse", "cell_distance")


def plot_metric_intervals(summary_df: pd.DataFrame, metrics: Sequence[str] | None = None) -> Figure:
    """Forest plot: per metric, each model's mean over held-out groups with its 95 % bootstrap interval,
    one colour per setting — overlapping intervals mean the data do not tell the models apart."""
    metrics = [m for m in (metrics or FOREST_METRICS) if m in summary_df and f"{m}_lo" in summary_df]
    if not metrics:
        raise EvalError(f"summary_df has no metric with intervals (<metric>_lo/_hi); has {listing(summary_df.columns)}")
    settings = _settings(summary_df)
    models = list(pd.unique(summary_df["model"]))
    fig = Figure(figsize=(3.3 * len(metrics) + 1.5, 0.42 * len(models) * max(1, len(settings)) + 1.6),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(metrics), sharey=True))
    colours = _colors(len(settings))
    offsets = np.linspace(-0.2, 0.2, len(settings)) if len(settings) > 1 else [0.0]
    for ax, metric in zip(axes, metrics):
        for colour, offset, setting in zip(colours, offsets, settings):
            table = summary_df if setting is None else summary_df[summary_df["setting"] == setting]
            table = table.set_index("model").reindex(models)
            y = np.arange(len(models)) + offset
            mean, lo, hi = (table[c].to_numpy(dtype=np.float64) for c in (metric, f"{metric}_lo", f"{metric}_hi"))
            ax.errorbar(mean, y, xerr=[mean - lo, hi - mean], fmt="o", color=colour, ms=4, capsize=2,
                        label=setting or "held-out groups")
        better = "higher" if HIGHER_IS_BETTER.get(metric, True) else "lower"
        ax.set(title=f"{metric} ({better} is better)", yticks=range(len(models)))
        ax.set_yticklabels(models)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    axes[-1].legend(loc="lower right", fontsize=8, frameon=False)
    return fig
