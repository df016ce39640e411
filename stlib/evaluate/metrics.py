"""Accuracy metrics for predicted perturbation responses: one number per group, cell type and model.

A *group* is one ``group_id``: the perturbed cells of one perturbation, cell type and time point (and
batch, if the predictor grouped by batch), predicted in ``pred`` and real in ``real``. Its *control* is
the real control cells of the same cell type and time point (all time points of the cell type when that
time point has none). Shifts are group mean − control mean, in X's space (G genes, or embedding dims).
The real shift is taken from all of the group's controls. The predicted shift is taken from the controls
the predictions were made from, when pred's obs names them (``basal_index``, as ``stlib predict`` and the
baselines write it): a model predicts from a random draw of control cells, and that draw's mean differs
from the full control mean by sampling noise that says nothing about the model. Without ``basal_index``,
all of the group's controls.

Metrics per group:
- ``gene_correlation``: Pearson r over G between predicted and real shift.
- ``direction_cosine``: cosine between the same two shifts (uncentred).
  Both are 0 when the predicted shift is (numerically) zero — no predicted change has no direction — and
  NaN when the real shift is zero.
- ``cell_distance``: energy distance between predicted and real perturbed cells, divided by the energy
  distance between the control cells and the real perturbed cells: 0 = same distribution, 1 = no better
  than predicting "no change", > 1 = worse. Energy distance E = 2E|X−Y| − E|X−X'| − E|Y−Y'| is computed
  by geomloss (``SamplesLoss("energy")`` = E/2) as the V-statistic (all pairs, self-pairs included): it is
  >= 0 and exactly 0 for identical sets (geomloss floors each distance at 1e-4, a negligible offset); its
  bias for two samples of one distribution is about E|X−X'|·(1/n + 1/m), small against real effects. At most ``max_cells`` cells per set, sampled with a
  fixed seed. NaN when the real cells equal the controls (zero denominator).
- ``mse``: mean over G of (predicted group mean − real group mean)².
- ``emb_gene_correlation``, ``emb_direction_cosine``: the same in ``obsm[embed_key]`` when X holds genes.
- ``de_overlap_<k>`` (k = 50, 100; gene space only): the share of the k genes with the largest real |shift| that
  are also among the k largest predicted |shift| — the field's "top DE genes recovered". ``de_direction_<k>``:
  of those k real top genes, the share whose predicted shift has the real sign. NaN with fewer than k genes.

Per perturbation and cell type, over T >= 3 time points:
- ``temporal_coherence``: do the predicted day-to-day changes follow the real ones? With real shifts
  R [T, G] and predicted shifts P [T, G], each centred over time (R − R̄, P − P̄: what changes between
  time points, the control's own day effect already removed), the score is their cosine over all T×G
  entries, in [−1, 1]: 1 when the prediction keeps the order and relative spacing of the time points
  (P − P̄ = c·(R − R̄), c > 0), −1 for exactly reversed changes, near −0.5 when days are swapped cyclically,
  0 when the prediction does not change over time (a constant shift, like both baselines), NaN with
  fewer than 3 time points or no real change over time. Using all G dims, not only positions along one
  axis, matters with 3 time points: a Pearson r of 3 projected positions is often near ±1 for unrelated
  predictions.

Aggregation: a cell type's row is the mean over its groups (temporal coherence: mean over
perturbations); the overall row (``cell_type == "all"``) is the mean over all groups, each group weighted
equally (temporal coherence: mean over perturbation × cell type). NaN values are skipped in means. Each overall
metric has ``<metric>_lo`` / ``<metric>_hi``: a 95 % bootstrap interval over the held-out groups
(:mod:`stlib.evaluate.intervals`).

Convention against cell-eval 0.8: cell-eval takes a predicted group's shift from all control cells in the file;
here it is taken from the controls the prediction was made from (above), which removes the draw's sampling noise
from the model's score. Baselines predict from the same drawn controls, so both conventions rank them alike.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from geomloss import SamplesLoss

from stlib.constants import BASAL_INDEX_KEY, GROUP_KEY, SOURCE_INDEX_KEY
from stlib.errors import listing
from stlib.evaluate import baselines
from stlib.evaluate.intervals import bootstrap_interval, with_intervals
from stlib.evaluate.layout import (
    ControlIndex,
    EvalError,
    EvalSettings,
    control_mask,
    group_table,
    mean_rows,
    read_settings,
    representation,
    rows,
)

GROUP_METRICS = ("gene_correlation", "cell_distance", "direction_cosine", "mse")
DE_TOP_K = (50, 100)
DE_METRICS = tuple(f"de_{kind}_{k}" for k in DE_TOP_K for kind in ("overlap", "direction"))
EMB_METRICS = ("emb_gene_correlation", "emb_direction_cosine")
# metric -> True when higher is better (plots colour by it; readers sort by it)
HIGHER_IS_BETTER = {
    "gene_correlation": True,
    "cell_distance": False,
    "direction_cosine": True,
    "temporal_coherence": True,
    "mse": False,
    "emb_gene_correlation": True,
    "emb_direction_cosine": True,
} | {name: True for name in DE_METRICS}
OVERALL = "all"  # cell_type value of the overall row
log = logging.getLogger(__name__)
_REL_EPS = 1e-6  # a predicted shift below this fraction of the real one counts as "no shift"
_energy = SamplesLoss("energy")


# ----------------------------------------------------------------------------------- vector scores


def direction_cosine(pred_shift: np.ndarray, real_shift: np.ndarray) -> float:
    """Cosine of two shifts; 0 for a zero predicted shift, NaN for a zero real shift."""
    pn, rn = np.linalg.norm(pred_shift), np.linalg.norm(real_shift)
    if rn == 0 or not np.isfinite(rn):
        return float("nan")
    if pn <= _REL_EPS * rn:
        return 0.0
    return float(np.dot(pred_shift, real_shift) / (pn * rn))


def pearson(pred: np.ndarray, real: np.ndarray) -> float:
    """Pearson r with the same zero conventions as :func:`direction_cosine`."""
    if len(real) < 2:
        return float("nan")
    return direction_cosine(pred - pred.mean(), real - real.mean())


def de_scores(pred_shift: np.ndarray, real_shift: np.ndarray, top_k=DE_TOP_K) -> dict[str, float]:
    """de_overlap_<k> and de_direction_<k> of one group (see the module docstring)."""
    out = {}
    for k in top_k:
        if len(real_shift) < k:
            out[f"de_overlap_{k}"] = out[f"de_direction_{k}"] = float("nan")
            continue
        real_top = np.argsort(-np.abs(real_shift), kind="stable")[:k]
        pred_top = np.argsort(-np.abs(pred_shift), kind="stable")[:k]
        out[f"de_overlap_{k}"] = len(np.intersect1d(real_top, pred_top)) / k
        out[f"de_direction_{k}"] = float(np.mean(np.sign(pred_shift[real_top]) == np.sign(real_shift[real_top])))
    return out


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Energy distance 2E|X−Y| − E|X−X'| − E|Y−Y'| (V-statistic) between two point clouds [N, G], [M, G]."""
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.float64)
    return max(0.0, 2.0 * float(_energy(xt, yt)))


def temporal_coherence(real_shifts: np.ndarray, pred_shifts: np.ndarray) -> float:
    """Cosine of time-centred real and predicted shifts, [T, G] each; NaN when T < 3."""
    real_shifts = np.asarray(real_shifts, dtype=np.float64)
    pred_shifts = np.asarray(pred_shifts, dtype=np.float64)
    if real_shifts.shape != pred_shifts.shape:
        raise EvalError(f"real and predicted shifts differ in shape: {real_shifts.shape} vs {pred_shifts.shape}")
    if real_shifts.ndim != 2 or real_shifts.shape[0] < 3:
        return float("nan")
    real_moves = real_shifts - real_shifts.mean(axis=0)
    if np.linalg.norm(real_moves) <= 1e-12 * max(1.0, np.abs(real_shifts).max()):
        return float("nan")  # the real response does not change over time: nothing to be coherent with
    return direction_cosine((pred_shifts - pred_shifts.mean(axis=0)).ravel(), real_moves.ravel())


# ----------------------------------------------------------------------------------- per group


def _subsample(idx: np.ndarray, max_cells: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(idx, max_cells, replace=False)) if len(idx) > max_cells else idx


def _check_pair(pred: AnnData, real: AnnData, s: EvalSettings) -> None:
    if list(pred.var_names) != list(real.var_names):
        raise EvalError(
            f"pred and real must have the same var names in the same order; got {pred.n_vars} vs {real.n_vars} "
            f"names, first difference at {_first_diff(pred.var_names, real.var_names)}"
        )
    pred_groups = set(pred.obs.loc[~control_mask(pred, s), GROUP_KEY].astype(str))
    real_groups = set(real.obs.loc[~control_mask(real, s), GROUP_KEY].astype(str))
    if pred_groups != real_groups:
        raise EvalError(
            f"group_id values differ between pred and real: only in pred {listing(pred_groups - real_groups)}, "
            f"only in real {listing(real_groups - pred_groups)}"
        )
    if not real_groups:
        raise EvalError(f"no perturbed cells: every cell has {s.pert_col}={s.control_pert!r}")


def _first_diff(a, b) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"position {i} ({x!r} vs {y!r})"
    return f"position {min(len(a), len(b))} (one list is longer)"


class BasalRows:
    """Rows of ``real`` holding the control cell each prediction was made from (pred obs ``basal_index``).

    ``control_mean`` gives the mean of those cells for a set of predicted rows, or the fallback (all of the
    group's controls) when pred does not name them or real lacks one of them (then with a warning).
    """

    def __init__(self, pred: AnnData, real: AnnData):
        self.rows = None
        if BASAL_INDEX_KEY not in pred.obs:
            return
        if SOURCE_INDEX_KEY not in real.obs:
            warnings.warn(f"pred has obs[{BASAL_INDEX_KEY!r}] but real has no obs[{SOURCE_INDEX_KEY!r}] to find "
                          "those cells: predicted shifts are taken from all of each group's controls", stacklevel=3)
            return
        lookup = pd.Series(np.arange(real.n_obs), index=real.obs[SOURCE_INDEX_KEY].to_numpy())
        lookup = lookup[~lookup.index.duplicated()]
        found = lookup.reindex(pred.obs[BASAL_INDEX_KEY].to_numpy())
        if found.isna().any():
            warnings.warn(f"{int(found.isna().sum())} of pred's obs[{BASAL_INDEX_KEY!r}] are not among real's "
                          f"obs[{SOURCE_INDEX_KEY!r}]: predicted shifts are taken from all of each group's controls",
                          stacklevel=3)
            return
        self.rows = found.to_numpy().astype(int)

    def control_mean(self, matrix, pred_rows: np.ndarray, fallback: np.ndarray) -> np.ndarray:
        if self.rows is None or len(pred_rows) == 0:
            return fallback
        return mean_rows(matrix, self.rows[pred_rows])


def group_metrics(
    pred: AnnData, real: AnnData, *, max_cells: int = 500, seed: int = 0, **settings: str | None
) -> pd.DataFrame:
    """One row per non-control group: group_id, pert, cell_type, time, cell counts and the group metrics."""
    s = read_settings(real, **settings)
    read_settings(pred, **settings)  # same columns must exist in pred
    _check_pair(pred, real, s)
    table = group_table(real, s)
    controls = ControlIndex(real, s)
    pred_ids = pred.obs[GROUP_KEY].astype(str).to_numpy()
    real_ids = real.obs[GROUP_KEY].astype(str).to_numpy()
    pred_pert, real_pert = ~control_mask(pred, s), ~control_mask(real, s)
    reps = [("", "X")]
    if s.space == "gene" and s.embed_key and s.embed_key in pred.obsm and s.embed_key in real.obsm:
        reps.append(("emb_", s.embed_key))
    mats = {rep: (representation(pred, rep), representation(real, rep)) for _, rep in reps}
    rng = np.random.default_rng(seed)
    basal = BasalRows(pred, real)
    out = []
    for gid, g in table.iterrows():
        p_idx = np.flatnonzero(pred_pert & (pred_ids == gid))
        r_idx = np.flatnonzero(real_pert & (real_ids == gid))
        c_idx = controls(g["cell_type"], g["time"])
        row = {
            GROUP_KEY: gid,
            "pert": g["pert"],
            "cell_type": g["cell_type"],
            "time": g["time"],
            "n_pred": len(p_idx),
            "n_real": len(r_idx),
            "n_control": len(c_idx),
        }
        for prefix, rep in reps:
            pm, rm = mats[rep]
            ctrl = mean_rows(rm, c_idx)
            p_mean, r_mean = mean_rows(pm, p_idx), mean_rows(rm, r_idx)
            p_shift = p_mean - basal.control_mean(rm, p_idx, ctrl)
            row[f"{prefix}gene_correlation"] = pearson(p_shift, r_mean - ctrl)
            row[f"{prefix}direction_cosine"] = direction_cosine(p_shift, r_mean - ctrl)
            if prefix:
                continue
            if s.space == "gene":
                row |= de_scores(p_shift, r_mean - ctrl)
            row["mse"] = float(np.mean((p_mean - r_mean) ** 2))
            p_cells = rows(pm, _subsample(p_idx, max_cells, rng))
            r_cells = rows(rm, _subsample(r_idx, max_cells, rng))
            c_cells = rows(rm, _subsample(c_idx, max_cells, rng))
            base = energy_distance(c_cells, r_cells)
            row["cell_distance"] = energy_distance(p_cells, r_cells) / base if base > 1e-12 else float("nan")
        out.append(row)
    return pd.DataFrame(out)


def temporal_table(pred: AnnData, real: AnnData, **settings: str | None) -> pd.DataFrame:
    """temporal_coherence per (pert, cell_type), pooling a time point's groups (e.g. several batches)."""
    s = read_settings(real, **settings)
    columns = ["pert", "cell_type", "n_times", "temporal_coherence"]
    if not s.time_col:
        return pd.DataFrame(columns=columns)
    controls = ControlIndex(real, s)
    basal = BasalRows(pred, real)
    pm, rm = representation(pred, "X"), representation(real, "X")

    def keys(adata):
        obs = adata.obs
        return (
            obs[s.pert_col].astype(str).to_numpy(),
            obs[s.cell_type_key].astype(str).to_numpy(),
            obs[s.time_col].astype(str).to_numpy(),
            ~control_mask(adata, s),
        )

    pp, pc, pt, pmask = keys(pred)
    rp, rc, rt, rmask = keys(real)
    out = []
    for (pert, ct), _ in pd.DataFrame({"p": rp[rmask], "c": rc[rmask]}).groupby(["p", "c"], sort=True):
        times = sorted(set(rt[rmask & (rp == pert) & (rc == ct)]) & set(pt[pmask & (pp == pert) & (pc == ct)]))
        real_shifts, pred_shifts = [], []
        for t in times:
            ctrl = mean_rows(rm, controls(ct, t))
            real_shifts.append(mean_rows(rm, np.flatnonzero(rmask & (rp == pert) & (rc == ct) & (rt == t))) - ctrl)
            p_idx = np.flatnonzero(pmask & (pp == pert) & (pc == ct) & (pt == t))
            pred_shifts.append(mean_rows(pm, p_idx) - basal.control_mean(rm, p_idx, ctrl))
        score = temporal_coherence(np.array(real_shifts), np.array(pred_shifts)) if len(times) >= 3 else np.nan
        out.append({"pert": pert, "cell_type": ct, "n_times": len(times), "temporal_coherence": score})
    return pd.DataFrame(out, columns=columns)


# ----------------------------------------------------------------------------------- per model


def model_groups(
    pred: AnnData, real: AnnData, *, max_cells: int = 500, seed: int = 0, **settings: str | None
) -> pd.DataFrame:
    """group_metrics plus each group's (pert, cell type) temporal_coherence, repeated over its time points."""
    groups = group_metrics(pred, real, max_cells=max_cells, seed=seed, **settings)
    temporal = temporal_table(pred, real, **settings)[["pert", "cell_type", "temporal_coherence"]]
    return groups.merge(temporal, on=["pert", "cell_type"], how="left") if len(temporal) else \
        groups.assign(temporal_coherence=np.nan)


def summarise(groups: pd.DataFrame, seed: int = 0) -> tuple[dict[str, float], pd.DataFrame]:
    """(overall metrics with 95 % intervals, per-cell-type table with an overall row) from model_groups' table."""
    metric_cols = [c for c in (*GROUP_METRICS, *DE_METRICS, *EMB_METRICS) if c in groups]
    units = groups.drop_duplicates(["pert", "cell_type"])  # temporal coherence: one value per (pert, cell type)
    per_ct = groups.groupby("cell_type", sort=True)[metric_cols].mean()
    per_ct.insert(0, "n_groups", groups.groupby("cell_type", sort=True).size())
    per_ct["temporal_coherence"] = units.groupby("cell_type")["temporal_coherence"].mean()
    overall = groups[metric_cols].mean()
    overall["n_groups"] = len(groups)
    overall["temporal_coherence"] = units["temporal_coherence"].mean()
    per_ct.loc[OVERALL] = overall
    per_ct = per_ct.reset_index(names="cell_type")
    per_ct["n_groups"] = per_ct["n_groups"].astype(int)
    summary = with_intervals({k: float(v) for k, v in overall.items()}, groups, metric_cols, seed)
    summary["temporal_coherence_lo"], summary["temporal_coherence_hi"] = bootstrap_interval(
        units["temporal_coherence"], seed=seed)
    return summary, per_ct


def compute_metrics(
    pred: AnnData, real: AnnData, *, max_cells: int = 500, seed: int = 0, **settings: str | None
) -> tuple[dict[str, float], pd.DataFrame]:
    """(overall metrics, per-cell-type table with an overall row ``cell_type == "all"``) for one model.

    Settings (pert_col, control_pert, cell_type_key, time_col, embed_key, space, ...) come from
    ``real.uns["stlib"]``; keyword arguments replace them.
    """
    return summarise(model_groups(pred, real, max_cells=max_cells, seed=seed, **settings), seed)


def _real_path(pred_path: Path) -> tuple[str, Path]:
    name = pred_path.name
    if not name.endswith("_pred.h5ad"):
        raise EvalError(f"{pred_path}: prediction files are named <model>_pred.h5ad")
    real = pred_path.with_name(name[: -len("_pred.h5ad")] + "_real.h5ad")
    if not real.exists():
        raise EvalError(f"{pred_path}: the matching real file {real.name} is missing in {pred_path.parent}")
    return name[: -len("_pred.h5ad")], real


def evaluate_groups(
    pred_paths: Sequence[str | Path], *, baselines_on_first: bool = True, max_cells: int = 500, seed: int = 0
) -> pd.DataFrame:
    """One row per (model, held-out group) for several models' ``<m>_pred.h5ad`` (each beside its
    ``<m>_real.h5ad``), plus the baselines, built on the first file's real cells from its model's control cells.

    Columns: model (``uns["stlib"]["model"]``, else the file stem), space, setting (``uns["stlib"]["setting"]``),
    the group's keys and its metrics. A model name seen twice is evaluated once.
    """
    tables, seen = [], set()
    first: tuple[AnnData, AnnData] | None = None

    def add(model: str, pred: AnnData, real: AnnData) -> None:
        s = read_settings(real)
        table = model_groups(pred, real, max_cells=max_cells, seed=seed)
        setting = str(real.uns.get("stlib", {}).get("setting", ""))
        tables.append(table.assign(model=model, space=s.space, setting=setting))

    for path in map(Path, pred_paths):
        stem, real_path = _real_path(path)
        pred, real = ad.read_h5ad(path), ad.read_h5ad(real_path)
        model = str(pred.uns.get("stlib", {}).get("model") or stem)
        if first is None:
            first = pred, real
        if model in seen:
            warnings.warn(f"model {model!r} given twice; {path} skipped", stacklevel=2)
            continue
        seen.add(model)
        add(model, pred, real)
    if first is None:
        raise EvalError("no prediction files given")
    if baselines_on_first:
        for name, make in baselines.BASELINES.items():
            if name in seen:
                continue
            try:
                add(name, make(first[1], pred=first[0]), first[1])
            except EvalError as exc:  # e.g. celltype_time_shift for unseen cell types: expected, so not a warning
                log.info("baseline %r left out: %s", name, exc)
    out = pd.concat(tables, ignore_index=True)
    front = ["model", "space", "setting"]
    return out[front + [c for c in out.columns if c not in front]]


def summarise_groups(groups: pd.DataFrame, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary: one row per setting x model with intervals, per-cell-type table) from evaluate_groups' table."""
    summaries, per_cts = [], []
    for (setting, model), table in groups.groupby(["setting", "model"], sort=False):
        summary, per_ct = summarise(table, seed)
        summaries.append({"setting": setting, "model": model, "space": table["space"].iat[0], **summary})
        per_cts.append(per_ct.assign(setting=setting, model=model))
    per_ct = pd.concat(per_cts, ignore_index=True)
    front = ["setting", "model"]
    return pd.DataFrame(summaries), per_ct[front + [c for c in per_ct.columns if c not in front]]


def evaluate_files(
    pred_paths: Sequence[str | Path], *, baselines_on_first: bool = True, max_cells: int = 500, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, per-cell-type table) of :func:`evaluate_groups`: one summary row per model and baseline."""
    groups = evaluate_groups(pred_paths, baselines_on_first=baselines_on_first, max_cells=max_cells, seed=seed)
    return summarise_groups(groups, seed)


def write_metrics(summary_df: pd.DataFrame, per_celltype_df: pd.DataFrame, out: str | Path) -> tuple[Path, Path]:
    """Write the summary and the per-cell-type table; returns both paths.

    ``out`` a folder: ``metrics_summary.csv`` and ``metrics_per_celltype.csv`` in it. ``out`` a ``.csv`` file:
    the summary goes exactly there and the per-cell-type table beside it, as ``<name>_per_celltype.csv``
    (``metrics_per_celltype.csv`` beside the default name ``metrics_summary.csv``).
    """
    out = Path(out)
    if out.suffix == ".csv":
        name = "metrics_per_celltype.csv" if out.name == "metrics_summary.csv" else f"{out.stem}_per_celltype.csv"
        paths = out, out.parent / name
    else:
        paths = out / "metrics_summary.csv", out / "metrics_per_celltype.csv"
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    summary_df.to_csv(paths[0], index=False)
    per_celltype_df.to_csv(paths[1], index=False)
    return paths
