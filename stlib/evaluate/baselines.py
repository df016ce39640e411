"""Reference predictions every model must beat, written in the layout of a ``<model>_pred.h5ad``.

- ``control_mean``: each perturbed group is predicted as the real control cells of its cell type and
  time point — "the perturbation does nothing". cell_distance is 1 by construction; cosine is 0.
- ``mean_shift``: the same control cells plus the training set's mean perturbed − control shift
  (``uns["stlib"]["train_mean_shift_X"]``, per perturbation). This linear baseline is what published
  perturbation benchmarks find hard to beat. The shift is added unclipped (so, in gene space, a value
  may dip below 0) to keep its group mean exactly control mean + training shift.

Both read everything from a real file: controls, groups and ``uns["stlib"]``; the training shifts stored there
are computed by :func:`train_mean_shifts` when the file is written. A group predicted from
controls keeps its own obs (perturbation, group_id, time, batch); ``source_index`` and ``basal_index`` are the
control cell's.
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


def _set(obs: pd.DataFrame, col: str, where: np.ndarray, values: np.ndarray) -> None:
    """Overwrite some rows of a column, categorical or not, keeping the dtype when possible."""
    was_cat = isinstance(obs[col].dtype, pd.CategoricalDtype)
    column = obs[col].astype(object).to_numpy().copy()
    column[where] = values
    obs[col] = pd.Categorical(column) if was_cat else pd.Series(column, index=obs.index).infer_objects()


def _controls_as_prediction(real: AnnData, s: EvalSettings, model: str) -> tuple[AnnData, np.ndarray]:
    """Pred-layout AnnData: real controls, then each group's matching controls relabelled as that group.

    Also returns the perturbation of every row ("" for the control block) for adding shifts.
    """
    table = group_table(real, s)
    controls = ControlIndex(real, s)
    ctrl_rows = np.flatnonzero(control_mask(real, s))
    blocks = [ctrl_rows] + [controls(g["cell_type"], g["time"]) for _, g in table.iterrows()]
    sizes = np.array([len(b) for b in blocks[1:]], dtype=int)
    idx = np.concatenate(blocks)
    with warnings.catch_warnings():  # controls shared by groups repeat; renamed just below
        warnings.filterwarnings("ignore", message="Observation names are not unique")
        out = real[idx].copy()
    out.obs_names = [f"{model}_{i}" for i in range(out.n_obs)]
    is_group = np.arange(out.n_obs) >= len(ctrl_rows)
    pert = np.repeat(table["pert"].to_numpy(dtype=object), sizes)
    _set(out.obs, s.pert_col, is_group, pert)
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
    return out, np.concatenate([np.full(len(ctrl_rows), "", dtype=object), pert])


def control_mean_baseline(real: AnnData, **settings: str | None) -> AnnData:
    """ "No effect": every perturbed group predicted as the controls of its cell type and time point."""
    s = read_settings(real, **settings)
    return _controls_as_prediction(real, s, "control_mean")[0]


def _add_shift(matrix, row_pert: np.ndarray, shifts: dict[str, np.ndarray], what: str) -> np.ndarray:
    dense = np.asarray(matrix.toarray() if sp.issparse(matrix) else matrix).copy()
    for pert, shift in shifts.items():
        if shift.shape != (dense.shape[1],):
            raise EvalError(f"{what} for {pert!r} has {shift.size} values, expected {dense.shape[1]}")
        dense[row_pert == pert] += shift.astype(dense.dtype)
    return dense


def mean_shift_baseline(real: AnnData, **settings: str | None) -> AnnData:
    """Controls + training mean shift (X and, when stored, the embedding): the linear baseline."""
    s = read_settings(real, **settings)
    out, row_pert = _controls_as_prediction(real, s, "mean_shift")
    perts = sorted(set(row_pert) - {""})
    stored = dict(real.uns.get(UNS_KEY, {}))
    for key, target in (("train_mean_shift_X", "X"), ("train_mean_shift_embedding", s.embed_key)):
        if key not in stored:
            if target == "X":
                train_shift(stored, key, perts[0])  # raises the clear error
            continue  # the embedding shift is optional
        if not hasattr(stored[key], "keys") and len(perts) > 1:
            raise EvalError(
                f"uns[{UNS_KEY!r}][{key!r}] is one array but there are {len(perts)} perturbations; "
                "store {pert: shift}"
            )
        shifts = {p: train_shift(stored, key, p) for p in perts}
        if target == "X":
            out.X = _add_shift(out.X, row_pert, shifts, key)
        elif target in out.obsm:
            out.obsm[target] = _add_shift(out.obsm[target], row_pert, shifts, key)
    return out


# name -> builder; evaluate_files adds one row per entry
BASELINES: dict[str, Callable[[AnnData], AnnData]] = {
    "control_mean": control_mean_baseline,
    "mean_shift": mean_shift_baseline,
}


def train_cell_type_shifts(dm: PerturbationDataModule, matrix) -> dict[str, dict[str, np.ndarray]]:
    """Per perturbation, per training cell type: its perturbed cells' mean minus its controls' mean, [G].

    Treated cells are the training split's; controls are every non-test control of that cell type.
    """
    labels = dm.split_labels
    obs = dm.adata.obs
    control = dm.data_cfg.control_pert
    pert = obs[dm.data_cfg.pert_col].astype(str).to_numpy()
    cell_type = obs[dm.data_cfg.cell_type_key].astype(str).to_numpy()
    out: dict[str, dict[str, np.ndarray]] = {}
    for p in sorted(set(pert[labels == "train"]) - {control}):
        for ct in sorted(set(cell_type[(labels == "train") & (pert == p)])):
            treated = np.flatnonzero((labels == "train") & (pert == p) & (cell_type == ct))
            ctrl = np.flatnonzero((pert == control) & (cell_type == ct) & (labels != "test"))
            if len(ctrl):
                out.setdefault(p, {})[ct] = mean_rows(matrix, treated) - mean_rows(matrix, ctrl)
    return out


def train_mean_shifts(dm: PerturbationDataModule, matrix) -> dict[str, np.ndarray]:
    """Per perturbation: the mean over training cell types of their shifts, [G] — the ``mean_shift`` baseline."""
    return {p: np.mean(list(by_type.values()), axis=0).astype(np.float32)
            for p, by_type in train_cell_type_shifts(dm, matrix).items()}
