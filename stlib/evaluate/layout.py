"""Reading the prediction-file layout that ``stlib predict`` writes (and the baselines imitate).

Each model has ``<model>_pred.h5ad`` and ``<model>_real.h5ad``: the same var names in the same order,
the same control cells in both, perturbed cells predicted in one and real in the other, matched by
``obs["group_id"]``. ``uns["stlib"]`` carries the column names, so evaluation needs no config file;
explicit keyword overrides win over it (for files written by other tools).

Shape letters: G genes (or embedding dims when X is the embedding), D embedding dims, T time points.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from stlib.constants import GROUP_KEY
from stlib.constants import PREDICTION_UNS_KEY as UNS_KEY
from stlib.errors import StlibError, listing

SPACES = ("gene", "embedding")


class EvalError(StlibError, ValueError):
    """A prediction file that does not follow the layout, phrased for whoever wrote it."""


@dataclass(frozen=True)
class EvalSettings:
    model: str  # model name (file stem without _pred)
    pert_col: str  # obs column naming the perturbation
    control_pert: str  # value of pert_col for control cells
    cell_type_key: str  # obs column with cell types
    embed_key: str = ""  # obsm key of the embedding; "" = none
    time_col: str = ""  # obs column with time points; "" = no time axis
    batch_col: str = ""  # obs column with batches; "" = none
    space: str = "embedding"  # "gene": X holds decoded genes; "embedding": X is the embedding


_REQUIRED = ("pert_col", "control_pert", "cell_type_key")


def read_settings(adata: AnnData, **overrides: str | None) -> EvalSettings:
    """Settings from ``uns["stlib"]``; keyword arguments that are not None replace stored values."""
    known = {f.name for f in fields(EvalSettings)}
    unknown = set(overrides) - known
    if unknown:
        raise EvalError(f"unknown setting(s) {listing(unknown)}; expected one of {listing(known)}")
    stored = dict(adata.uns.get(UNS_KEY, {}))
    values = {k: stored[k] for k in known if k in stored and stored[k] is not None}
    values.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k in _REQUIRED if not values.get(k)]
    if missing:
        raise EvalError(
            f"missing setting(s) {listing(missing)}: not in uns[{UNS_KEY!r}] (has {listing(stored)}) "
            "and not passed as keyword arguments"
        )
    values.setdefault("model", "model")
    values = {k: str(v) for k, v in values.items()}
    settings = EvalSettings(**values)
    if settings.space not in SPACES:
        raise EvalError(f"uns[{UNS_KEY!r}]['space']={settings.space!r} is not one of {listing(SPACES)}")
    for col in (settings.pert_col, settings.cell_type_key, GROUP_KEY, settings.time_col):
        if col and col not in adata.obs:
            raise EvalError(f"obs column {col!r} not found; obs has {listing(adata.obs.columns)}")
    if settings.batch_col and settings.batch_col not in adata.obs:
        settings = replace(settings, batch_col="")  # documented as optional
    return settings


def control_mask(adata: AnnData, s: EvalSettings) -> np.ndarray:
    return (adata.obs[s.pert_col].astype(str) == s.control_pert).to_numpy()


def group_table(adata: AnnData, s: EvalSettings) -> pd.DataFrame:
    """One row per non-control group_id: pert, cell_type, time (or None), first batch value."""
    obs = adata.obs.loc[~control_mask(adata, s)]
    cols = {"pert": s.pert_col, "cell_type": s.cell_type_key}
    if s.time_col:
        cols["time"] = s.time_col
    if s.batch_col:
        cols["batch"] = s.batch_col
    table = pd.DataFrame({name: obs[col].astype(object).to_numpy() for name, col in cols.items()})
    table["pert"] = table["pert"].astype(str)
    table["cell_type"] = table["cell_type"].astype(str)
    table[GROUP_KEY] = obs[GROUP_KEY].astype(str).to_numpy()
    first = table.groupby(GROUP_KEY, sort=True).first()
    for name in ("pert", "cell_type", "time"):
        if name in table and (table.groupby(GROUP_KEY)[name].nunique() > 1).any():
            raise EvalError(f"a group_id spans several values of {cols[name]!r}; one group = one {name}")
    if "time" not in first:
        first["time"] = None
    return first


class ControlIndex:
    """Row indices of the control cells matching a cell type and time point.

    Falls back to all time points of the cell type when a time point has no controls; raises when the
    cell type has none at all (a shift from control cannot be defined then).
    """

    def __init__(self, real: AnnData, s: EvalSettings):
        obs = real.obs
        rows = np.flatnonzero(control_mask(real, s))
        ct = obs[s.cell_type_key].astype(str).to_numpy()[rows]
        tm = obs[s.time_col].astype(str).to_numpy()[rows] if s.time_col else np.full(len(rows), "")
        self._by_ct_time = pd.Series(rows).groupby([ct, tm]).apply(np.asarray).to_dict() if len(rows) else {}
        self._by_ct = pd.Series(rows).groupby(ct).apply(np.asarray).to_dict() if len(rows) else {}

    def __call__(self, cell_type, time=None) -> np.ndarray:
        key = (str(cell_type), "" if time is None else str(time))
        if key in self._by_ct_time:
            return self._by_ct_time[key]
        if str(cell_type) in self._by_ct:
            return self._by_ct[str(cell_type)]
        raise EvalError(f"no control cells of cell type {cell_type!r}; control cell types: {listing(self._by_ct)}")


def representation(adata: AnnData, rep: str):
    """X (rep == "X") or obsm[rep]: a dense array or a sparse matrix, rows = cells."""
    if rep == "X":
        return adata.X
    if rep not in adata.obsm:
        raise EvalError(f"obsm[{rep!r}] not found; obsm has {listing(adata.obsm.keys())}")
    return adata.obsm[rep]


def rows(matrix, idx: np.ndarray) -> np.ndarray:
    """Dense float64 rows of a dense or sparse matrix."""
    out = matrix[idx]
    if sp.issparse(out):
        out = out.toarray()
    return np.asarray(out, dtype=np.float64)


def mean_rows(matrix, idx: np.ndarray) -> np.ndarray:
    """[G] mean of the given rows, float64, without densifying a sparse matrix."""
    if sp.issparse(matrix):
        return np.asarray(matrix[idx].mean(axis=0), dtype=np.float64).ravel()
    return np.asarray(matrix[idx], dtype=np.float64).mean(axis=0)


def train_shift(s_uns: dict, key: str, pert: str) -> np.ndarray:
    """Training-set mean shift for one perturbation: ``uns[key]`` as {pert: [G]} or one [G] array."""
    if key not in s_uns:
        raise EvalError(f"uns[{UNS_KEY!r}][{key!r}] not found (needed by the mean-shift baseline)")
    value = s_uns[key]
    if isinstance(value, dict) or hasattr(value, "keys"):
        if str(pert) not in value:
            raise EvalError(f"uns[{UNS_KEY!r}][{key!r}] has no entry for perturbation {pert!r}; has {listing(value)}")
        return np.asarray(value[str(pert)], dtype=np.float64).ravel()
    return np.asarray(value, dtype=np.float64).ravel()
