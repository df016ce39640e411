"""Reference predictions every model must beat, written in the layout of a ``<model>_pred.h5ad``.

Every baseline predicts a group as control cells plus a shift, in X and (when stored) in the embedding:

- ``control_mean``: no shift — "the perturbation does nothing". cell_distance ~1; cosine 0.
- ``mean_shift``: the pooled training shift of the perturbation (mean over training groups of
  group mean − control mean, ``uns["stlib"]["train_mean_shift_X"]``).
- ``celltype_time_shift``: the training shift of the same perturbation, cell type and time point — only where
  that cell type was seen in training (held-out mice, not held-out cell types); other groups are left out.
- ``additive_linear``: shift = perturbation effect + cell-type effect + time effect, least squares over the
  training groups (deviation coding: an unseen cell type or time point gets the average, 0). Linear baselines
  are the ones deep perturbation models most often fail to beat (Ahlmann-Eltze et al., Nature Methods 2025).

The control cells are the model's: given a model's pred file, each predicted cell's control (its
``basal_index``) gets the shift, so models and baselines predict from the same cells and every metric (mse,
cell distance included) compares like with like. Without one, all of a group's controls are used once each.
In gene space a baseline's values are floored at 0 (valid log-expression, as predictions are).

The training fits come from ``uns["stlib"]["train_groups"]``, written by :func:`train_group_shifts` from
training cells only (treated cells and controls labelled "train").
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from stlib.constants import BASAL_INDEX_KEY, GROUP_KEY, SOURCE_INDEX_KEY
from stlib.constants import PREDICTION_UNS_KEY as UNS_KEY
from stlib.data.datamodule import PerturbationDataModule
from stlib.evaluate.layout import (
    ControlIndex,
    EvalError,
    EvalSettings,
    control_mask,
    group_table,
    mean_rows,
    read_settings,
    train_shift,
)

TRAIN_GROUPS_KEY = "train_groups"  # uns["stlib"] entry: {pert, cell_type, time: [n] str, X: [n, G], embedding: [n, D]}


# ------------------------------------------------------------------------------------------- training fits


def train_group_shifts(dm: PerturbationDataModule, matrices: dict[str, object]) -> dict[str, np.ndarray]:
    """Per training (perturbation, cell type, time point): treated mean − control mean, for each matrix.

    Training cells only: treated cells and controls labelled "train"; controls of the same cell type and time
    point, else of the cell type. Returns the ``uns["stlib"]["train_groups"]`` dict.
    """
    cfg = dm.data_cfg
    obs, train = dm.adata.obs, dm.split_labels == "train"
    pert = obs[cfg.pert_col].astype(str).to_numpy()
    cell_type = obs[cfg.cell_type_key].astype(str).to_numpy()
    time = obs[cfg.time_col].astype(str).to_numpy() if cfg.time_col else np.full(len(obs), "")
    treated = train & (pert != cfg.control_pert)
    control = train & (pert == cfg.control_pert)
    keys, shifts = [], {name: [] for name in matrices}
    frame = pd.DataFrame({"p": pert[treated], "c": cell_type[treated], "t": time[treated]}).drop_duplicates()
    for p, ct, t in frame.sort_values(["p", "c", "t"]).itertuples(index=False):
        rows = np.flatnonzero(treated & (pert == p) & (cell_type == ct) & (time == t))
        ctrl = np.flatnonzero(control & (cell_type == ct) & (time == t))
        ctrl = ctrl if len(ctrl) else np.flatnonzero(control & (cell_type == ct))
        if not len(ctrl):
            continue
        keys.append((p, ct, t))
        for name, matrix in matrices.items():
            shifts[name].append(mean_rows(matrix, rows) - mean_rows(matrix, ctrl))
    width = {name: (np.shape(m)[1],) for name, m in matrices.items()}
    out = {col: np.array([k[i] for k in keys], dtype=str) for i, col in enumerate(("pert", "cell_type", "time"))}
    out |= {name: (np.stack(v) if v else np.zeros((0, *width[name]))).astype(np.float32) for name, v in shifts.items()}
    return out


def pooled_shifts(groups: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """Per perturbation: the mean over its training groups of their shifts — the ``mean_shift`` baseline."""
    return {p: groups[name][groups["pert"] == p].mean(axis=0).astype(np.float32) for p in np.unique(groups["pert"])}


def _stored_groups(real: AnnData) -> dict[str, np.ndarray]:
    stored = dict(real.uns.get(UNS_KEY, {}))
    if TRAIN_GROUPS_KEY not in stored:
        raise EvalError(f"uns[{UNS_KEY!r}][{TRAIN_GROUPS_KEY!r}] not found: written by `stlib predict` (re-run it)")
    groups = dict(stored[TRAIN_GROUPS_KEY])
    return {k: np.asarray(v).astype(str) if k in ("pert", "cell_type", "time") else np.asarray(v, np.float64)
            for k, v in groups.items()}


def _effects_design(levels: dict[str, list[str]], rows: pd.DataFrame) -> np.ndarray:
    """One-hot perturbation + deviation-coded cell type and time (an unknown level codes as all zeros)."""
    cols = [(rows["pert"].to_numpy()[:, None] == np.array(levels["pert"])[None]).astype(float)]
    for factor in ("cell_type", "time"):
        known = levels[factor]
        if len(known) < 2:
            continue
        values = rows[factor].to_numpy()
        block = (values[:, None] == np.array(known[:-1])[None]).astype(float)
        block[values == known[-1]] = -1.0  # deviation coding: effects sum to zero over the training levels
        cols.append(block)
    return np.concatenate(cols, axis=1)


def additive_shifts(groups: dict[str, np.ndarray], name: str, table: pd.DataFrame) -> np.ndarray:
    """[n_groups, G] perturbation + cell type + time effects fitted on the training groups, for table's groups."""
    train = pd.DataFrame({k: groups[k] for k in ("pert", "cell_type", "time")})
    levels = {k: sorted(set(train[k])) for k in train}
    coef, *_ = np.linalg.lstsq(_effects_design(levels, train), groups[name], rcond=None)
    query = pd.DataFrame({"pert": table["pert"].astype(str), "cell_type": table["cell_type"].astype(str),
                          "time": table["time"].astype(str) if table["time"].notna().all() else ""})
    unknown = set(query["pert"]) - set(levels["pert"])
    if unknown:
        raise EvalError(f"additive_linear: perturbation(s) {sorted(unknown)} have no training groups")
    return _effects_design(levels, query) @ coef


# ------------------------------------------------------------------------------------------- building


def _set(obs: pd.DataFrame, col: str, where: np.ndarray, values: np.ndarray) -> None:
    """Overwrite some rows of a column, categorical or not, keeping the dtype when possible."""
    was_cat = isinstance(obs[col].dtype, pd.CategoricalDtype)
    column = obs[col].astype(object).to_numpy().copy()
    column[where] = values
    obs[col] = pd.Categorical(column) if was_cat else pd.Series(column, index=obs.index).infer_objects()


def _model_controls(real: AnnData, s: EvalSettings, pred: AnnData | None, table: pd.DataFrame) -> list[np.ndarray]:
    """Rows of ``real`` each group is predicted from: the model's basal cells, else all matching controls."""
    controls = ControlIndex(real, s)
    fallback = [controls(g["cell_type"], g["time"]) for _, g in table.iterrows()]
    if pred is None or BASAL_INDEX_KEY not in pred.obs or SOURCE_INDEX_KEY not in real.obs:
        return fallback
    lookup = pd.Series(np.arange(real.n_obs), index=real.obs[SOURCE_INDEX_KEY].to_numpy())
    lookup = lookup[~lookup.index.duplicated()]
    pred_ids = pred.obs[GROUP_KEY].astype(str).to_numpy()
    pred_pert = ~control_mask(pred, s)
    blocks = []
    for gid in table.index:
        found = lookup.reindex(pred.obs[BASAL_INDEX_KEY].to_numpy()[pred_pert & (pred_ids == gid)])
        if found.isna().any() or not len(found):
            warnings.warn(f"pred's {BASAL_INDEX_KEY} for group {gid!r} are not all controls in real: baselines use "
                          "all of the group's controls", stacklevel=3)
            return fallback
        blocks.append(found.to_numpy().astype(int))
    return blocks


def _controls_as_prediction(real: AnnData, s: EvalSettings, model: str, table: pd.DataFrame,
                            pred: AnnData | None = None) -> tuple[AnnData, np.ndarray]:
    """Pred-layout AnnData: real controls, then each group of ``table`` as its controls relabelled as that group.

    Also returns each row's position in ``table`` (-1 for the control block), for adding shifts.
    """
    ctrl_rows = np.flatnonzero(control_mask(real, s))
    blocks = [ctrl_rows, *_model_controls(real, s, pred, table)]
    sizes = np.array([len(b) for b in blocks[1:]], dtype=int)
    with warnings.catch_warnings():  # controls shared by groups repeat; renamed just below
        warnings.filterwarnings("ignore", message="Observation names are not unique")
        out = real[np.concatenate(blocks)].copy()
    out.obs_names = [f"{model}_{i}" for i in range(out.n_obs)]
    is_group = np.arange(out.n_obs) >= len(ctrl_rows)
    _set(out.obs, s.pert_col, is_group, np.repeat(table["pert"].to_numpy(dtype=object), sizes))
    _set(out.obs, GROUP_KEY, is_group, np.repeat(table.index.to_numpy(dtype=object), sizes))
    if s.time_col:
        _set(out.obs, s.time_col, is_group, np.repeat(table["time"].to_numpy(dtype=object), sizes))
    if s.batch_col:
        _set(out.obs, s.batch_col, is_group, np.repeat(table["batch"].to_numpy(dtype=object), sizes))
    if SOURCE_INDEX_KEY in out.obs:  # each row is predicted from itself
        out.obs[BASAL_INDEX_KEY] = out.obs[SOURCE_INDEX_KEY].to_numpy()
    out.layers = {}
    out.obsm = {s.embed_key: out.obsm[s.embed_key]} if s.embed_key in out.obsm else {}
    out.uns = {UNS_KEY: {**copy.deepcopy(dict(real.uns[UNS_KEY])), "model": model}} if UNS_KEY in real.uns else {}
    return out, np.concatenate([np.full(len(ctrl_rows), -1), np.repeat(np.arange(len(table)), sizes)])


def _add(matrix, row_group: np.ndarray, shifts: np.ndarray, floor: bool) -> np.ndarray:
    dense = np.asarray(matrix.toarray() if sp.issparse(matrix) else matrix, dtype=np.float32).copy()
    if shifts.shape[1] != dense.shape[1]:
        raise EvalError(f"training shifts have {shifts.shape[1]} values per group, the file {dense.shape[1]}")
    grouped = row_group >= 0
    dense[grouped] += shifts[row_group[grouped]].astype(np.float32)
    return np.maximum(dense, 0.0) if floor else dense


def _shifted(real: AnnData, model: str, pred: AnnData | None, shift_for: Callable, keep=None,
             **settings) -> AnnData:
    """Controls + shift_for(representation name, table) [n_groups, G] in X and the embedding (None: no fit)."""
    s = read_settings(real, **settings)
    table = group_table(real, s)
    if keep is not None:
        table = table[keep(table)]
        if table.empty:
            raise EvalError(f"{model}: no held-out group has what this baseline needs")
    out, row_group = _controls_as_prediction(real, s, model, table, pred)
    out.X = _add(out.X, row_group, shift_for("X", table), floor=s.space == "gene")
    if s.embed_key in out.obsm and s.space == "gene":
        emb_shift = shift_for("embedding", table)
        if emb_shift is None:
            del out.obsm[s.embed_key]  # no embedding fit stored: the embedding metrics are left out
        else:
            out.obsm[s.embed_key] = _add(out.obsm[s.embed_key], row_group, emb_shift, False)
    elif s.embed_key in out.obsm:
        out.obsm[s.embed_key] = out.X.copy()
    return out


def control_mean_baseline(real: AnnData, pred: AnnData | None = None, **settings: str | None) -> AnnData:
    """ "No effect": every perturbed group predicted as its controls."""
    s = read_settings(real, **settings)
    return _controls_as_prediction(real, s, "control_mean", group_table(real, s), pred)[0]


def mean_shift_baseline(real: AnnData, pred: AnnData | None = None, **settings: str | None) -> AnnData:
    """Controls + the pooled training shift of the perturbation (X and, when stored, the embedding)."""
    stored = dict(real.uns.get(UNS_KEY, {}))

    def shift_for(rep: str, table: pd.DataFrame) -> np.ndarray:
        key = "train_mean_shift_X" if rep == "X" else "train_mean_shift_embedding"
        if rep != "X" and key not in stored:
            return None
        if not hasattr(stored.get(key), "keys") and table["pert"].nunique() > 1:
            raise EvalError(f"uns[{UNS_KEY!r}][{key!r}] is one array but there are {table['pert'].nunique()} "
                            "perturbations; store {pert: shift}")
        return np.stack([train_shift(stored, key, p) for p in table["pert"]])

    return _shifted(real, "mean_shift", pred, shift_for, **settings)


def celltype_time_shift_baseline(real: AnnData, pred: AnnData | None = None, **settings: str | None) -> AnnData:
    """Controls + the training shift of the same perturbation, cell type and time point (seen cell types only)."""
    groups = _stored_groups(real)
    index = {key: i for i, key in enumerate(zip(groups["pert"], groups["cell_type"], groups["time"], strict=True))}

    def key(g) -> tuple[str, str, str]:
        return str(g["pert"]), str(g["cell_type"]), "" if g["time"] is None else str(g["time"])

    def shift_for(rep: str, table: pd.DataFrame) -> np.ndarray:
        if rep not in groups:
            return None
        return groups[rep][[index[key(g)] for _, g in table.iterrows()]]

    return _shifted(real, "celltype_time_shift", pred, shift_for,
                    keep=lambda t: np.array([key(g) in index for _, g in t.iterrows()], bool), **settings)


def additive_linear_baseline(real: AnnData, pred: AnnData | None = None, **settings: str | None) -> AnnData:
    """Controls + perturbation + cell type + time effects, least squares on the training groups."""
    groups = _stored_groups(real)

    def shift_for(rep: str, table: pd.DataFrame) -> np.ndarray:
        if rep not in groups:
            return None
        return additive_shifts(groups, rep, table)

    return _shifted(real, "additive_linear", pred, shift_for, **settings)


# name -> builder(real, pred=None); evaluate_files adds one row per entry
BASELINES: dict[str, Callable[..., AnnData]] = {
    "control_mean": control_mean_baseline,
    "mean_shift": mean_shift_baseline,
    "celltype_time_shift": celltype_time_shift_baseline,
    "additive_linear": additive_linear_baseline,
}
