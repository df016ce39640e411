"""RNA velocity with scvelo, expressed in the model's space (the embedding the ST model reads).

Why: the velocity-alignment loss compares each predicted shift (pred - basal, in the model's space) with
the cell's RNA velocity in that same space, weighted by how much scvelo trusts it.

``compute_velocity`` runs scvelo on ``layers["spliced"/"unspliced"]`` of a *copy* (scvelo's
``filter_and_normalize`` rewrites X and both layers and drops genes), then writes back into the input only.
Given ``pert_col`` and ``control_pert`` it uses the control cells only — the only cells whose velocity a model
reads (basal cells, in the loss and at prediction) — so no perturbed cell, held-out or not, shapes the field:
gene filtering, normalisation, PCA, neighbours, moments and the velocity graph all see controls alone, and every
other cell gets velocity 0 and confidence 0. Written:

* ``obsm["velocity_<embed_key>"]`` [N, D] — scvelo's ``velocity_embedding``: for each cell the
  transition-probability-weighted mean of unit displacement vectors to its neighbours in the embedding,
  minus the uniform-weight mean (so a cell with no preferred direction gets ~0). This is computed in the
  embedding's full dimension; it works for D = 64 (and 2000) because it never goes through a 2-d plot.
  ``autoscale`` is off: scvelo's autoscale fits a matplotlib quiver on the first two dimensions, which
  is meaningless here. The scale is arbitrary; the loss only uses directions.
* ``obs["velocity_confidence"]`` in [0, 1] — scvelo's coherence of a cell's velocity with its
  neighbours' (a correlation in [-1, 1]), clipped at 0; NaN -> 0.
* ``uns["stlib_velocity"]`` = {embed_key, version, mode, n_neighbors, n_pcs, pert_col, control_pert} — read by
  the cache.

X, layers, obs and var of the input are left as they were. The neighbour graph is scvelo's usual one
(PCA of the normalised, log1p spliced counts, 30 neighbours), built with scanpy's exact sklearn kNN so no
numba JIT runs (umap/pynndescent would compile in every process); displacements are measured in the embedding.

embed_key: an obsm key ("X_state" -> scvelo basis "state"); a key without the "X_" prefix, or "X"
itself (the expression matrix as the model's space, densified), is copied under a temporary "X_<basis>"
key on the working copy only. Memory: below 10 000 cells scvelo densifies the N x N transition matrix
(0.3 GB at 6000 cells); above, it stays sparse.

Shape letters: N cells, G genes, D embedding dimension.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from stlib.constants import VELOCITY_CONFIDENCE_KEY as CONFIDENCE_KEY
from stlib.constants import VELOCITY_UNS_KEY as UNS_KEY
from stlib.constants import velocity_key
from stlib.errors import DataError, listing

PIPELINE_VERSION = "2"  # bump when the computation changes: invalidates cached files
_TMP_BASIS = "stlib_velocity_basis"


class VelocityError(DataError):
    """The AnnData cannot give velocity as asked (missing layers, unknown embedding key, bad mode)."""


def _stochastic(scv, adata, n_jobs: int) -> None:
    scv.tl.velocity(adata, mode="stochastic")


def _deterministic(scv, adata, n_jobs: int) -> None:
    scv.tl.velocity(adata, mode="deterministic")


def _dynamical(scv, adata, n_jobs: int) -> None:  # much slower: fits the full kinetic model per gene first
    scv.tl.recover_dynamics(adata, n_jobs=n_jobs, show_progress_bar=False)
    scv.tl.velocity(adata, mode="dynamical")


VELOCITY_MODES = {"stochastic": _stochastic, "deterministic": _deterministic, "dynamical": _dynamical}


@contextlib.contextmanager
def _quiet_scvelo():
    """scvelo prints progress and warns about deprecated numpy/pandas use; keep the caller's log clean."""
    import scvelo as scv

    old = scv.settings.verbosity
    scv.settings.verbosity = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield scv
    finally:
        scv.settings.verbosity = old


def _check(layers, obsm, embed_key: str, mode: str) -> None:
    """The layers and embedding velocity reads are there (names of an AnnData's, or an h5ad file's, layers and obsm)."""
    missing = [k for k in ("spliced", "unspliced") if k not in layers]
    if missing:
        have = ", ".join(layers) or "none"
        raise VelocityError(
            f"RNA velocity needs layers['spliced'] and layers['unspliced']; missing {missing} (layers present: {have})"
        )
    if embed_key != "X" and embed_key not in obsm:
        have = ", ".join(obsm) or "none"
        raise VelocityError(f"embed_key={embed_key!r} is not in obsm (obsm keys: {have}; or use 'X')")
    if mode not in VELOCITY_MODES:
        raise VelocityError(f"mode={mode!r} is not one of {', '.join(VELOCITY_MODES)}")


def _control_rows(obs: pd.DataFrame, pert_col: str | None, control_pert: str | None) -> np.ndarray | None:
    """Rows of the control cells, or None (every cell) when neither is given."""
    if pert_col is None and control_pert is None:
        return None
    if not pert_col or control_pert is None:
        raise VelocityError("give both pert_col and control_pert (--pert-col, --control-pert), or neither")
    if pert_col not in obs:
        raise VelocityError(f"--pert-col {pert_col!r} is not an obs column; obs columns: {listing(obs.columns)}")
    values = obs[pert_col].astype(str).to_numpy()
    rows = np.flatnonzero(values == str(control_pert))
    if len(rows) < 3:
        raise VelocityError(f"--control-pert {control_pert!r} marks {len(rows)} cell(s) in obs[{pert_col!r}]; values "
                            f"there: {listing(set(values))}")
    return rows


def _dense64(x) -> np.ndarray:
    """The model's space as scvelo's velocity_embedding reads it: dense float64."""
    return (x.toarray() if sp.issparse(x) else np.asarray(x)).astype(np.float64)


def _basis(embed_key: str) -> str:
    """scvelo's basis name for an obsm key ("X_state" -> "state"); other keys go under a temporary name."""
    return embed_key[2:] if embed_key.startswith("X_") and embed_key != "X_" else _TMP_BASIS


def _working_copy(spliced, unspliced, coordinates: np.ndarray, basis: str) -> ad.AnnData:
    """The AnnData scvelo rewrites: float32 counts (X = spliced, for the PCA) and the embedding under X_<basis>."""
    work = ad.AnnData(X=spliced.astype(np.float32),
                      layers={"spliced": spliced.astype(np.float32), "unspliced": unspliced.astype(np.float32)})
    work.obsm[f"X_{basis}"] = coordinates
    return work


def _velocity_in_place(work: ad.AnnData, basis: str, n_neighbors: int, n_pcs: int, mode: str, min_shared_counts: int,
                       n_jobs: int, n_top_genes: int | None) -> tuple[np.ndarray, np.ndarray]:
    """scvelo on a working copy it may rewrite -> (velocity in X_<basis> [N, D] float32, confidence [N] in [0, 1])."""
    import scanpy as sc

    pcs = min(n_pcs, work.n_vars - 1, work.n_obs - 1)
    with _quiet_scvelo() as scv:
        # float layers would read as "already normalised" to scvelo: name them to force normalisation
        scv.pp.filter_and_normalize(
            work, min_shared_counts=min_shared_counts, layers_normalize=["X", "spliced", "unspliced"]
        )
        sc.pp.log1p(work)  # X only (for the PCA behind the neighbour graph); scvelo 0.3.4 leaves this to scanpy
        if n_top_genes is not None and work.n_vars > n_top_genes:
            sc.pp.highly_variable_genes(work, n_top_genes=n_top_genes, subset=True)
        if work.n_vars < 2:
            raise VelocityError(f"only {work.n_vars} gene(s) pass min_shared_counts={min_shared_counts}; lower it")
        pcs = min(pcs, work.n_vars - 1)
        sc.pp.pca(work, n_comps=pcs, random_state=0)
        # exact sklearn kNN + gauss kernel: no numba JIT (umap/pynndescent compile in every process); scvelo's
        # moments binarise the graph anyway, so the kernel does not change Ms/Mu
        sc.pp.neighbors(work, n_neighbors=n_neighbors, n_pcs=pcs, method="gauss", transformer="sklearn")
        scv.pp.moments(work, n_pcs=pcs, n_neighbors=n_neighbors)
        warnings.simplefilter("ignore")  # scvelo's deprecation helper re-enables DeprecationWarning globally
        VELOCITY_MODES[mode](scv, work, n_jobs)
        for key in ("spliced", "unspliced", "Mu", "variance_velocity"):  # read by none of the steps below: freed
            work.layers.pop(key, None)
        work.X = sp.csr_matrix(work.shape, dtype=np.float32)
        scv.tl.velocity_graph(work, n_jobs=n_jobs, show_progress_bar=False)
        scv.tl.velocity_confidence(work)
        scv.tl.velocity_embedding(work, basis=basis, autoscale=False)
    v = np.nan_to_num(np.asarray(work.obsm[f"velocity_{basis}"], dtype=np.float32))
    conf = np.clip(np.nan_to_num(np.asarray(work.obs[CONFIDENCE_KEY], dtype=np.float32), nan=0.0), 0.0, 1.0)
    return v, conf


def _params(embed_key, mode, n_neighbors, n_pcs, pert_col, control_pert, n_top_genes) -> dict:
    """uns["stlib_velocity"]: what made the velocity (the cache compares it)."""
    return {"embed_key": embed_key, "version": _version(), "mode": mode, "n_neighbors": n_neighbors, "n_pcs": n_pcs,
            "pert_col": pert_col or "", "control_pert": "" if control_pert is None else str(control_pert),
            "n_top_genes": "" if n_top_genes is None else int(n_top_genes)}


def _on_every_cell(rows: np.ndarray | None, n_cells: int, v: np.ndarray, conf: np.ndarray):
    """Velocity of the rows it was computed on, zeros (no velocity, no weight) for every other cell."""
    if rows is None:
        return v, conf
    v_all, conf_all = np.zeros((n_cells, v.shape[1]), np.float32), np.zeros(n_cells, np.float32)
    v_all[rows], conf_all[rows] = v, conf
    return v_all, conf_all


def compute_velocity(
    adata: ad.AnnData,
    embed_key: str = "X_state",
    n_neighbors: int = 30,
    n_pcs: int = 30,
    mode: str = "stochastic",
    min_shared_counts: int = 20,
    n_jobs: int = 1,
    pert_col: str | None = None,
    control_pert: str | None = None,
    n_top_genes: int | None = None,
) -> ad.AnnData:
    """scvelo velocity projected into obsm[embed_key]; adds obsm/obs/uns keys in place and returns adata.

    n_top_genes: estimate on that many most variable genes after scvelo's filter (less memory and time); None = all
    genes that pass. Not a free speed-up: it changes the field (benchmarks/velocity_scale.md).
    pert_col / control_pert: compute from the control cells only (the others get 0); None for both: every cell.
    n_jobs: loky processes for scvelo's velocity graph, the slowest step; identical results. Each process pays
    a start-up cost, so more than one pays off on many-core nodes only."""
    _check(adata.layers, adata.obsm, embed_key, mode)
    rows = _control_rows(adata.obs, pert_col, control_pert)
    source = adata if rows is None else adata[rows]
    basis = _basis(embed_key)
    space = source.X if embed_key == "X" else source.obsm[embed_key]
    work = _working_copy(source.layers["spliced"], source.layers["unspliced"], _dense64(space), basis)
    v, conf = _velocity_in_place(work, basis, n_neighbors, n_pcs, mode, min_shared_counts, n_jobs, n_top_genes)
    adata.obsm[velocity_key(embed_key)], adata.obs[CONFIDENCE_KEY] = _on_every_cell(rows, adata.n_obs, v, conf)
    adata.uns[UNS_KEY] = _params(embed_key, mode, n_neighbors, n_pcs, pert_col, control_pert, n_top_genes)
    return adata


def _version() -> str:
    import scvelo

    return f"stlib-velocity-{PIPELINE_VERSION}/scvelo-{scvelo.__version__}"


def default_output_path(in_path: str | Path) -> Path:
    """`<stem>.velocity.h5ad` next to the input: never overwrites the input."""
    in_path = Path(in_path)
    return in_path.with_name(f"{in_path.stem}.velocity.h5ad")


def _cached_params(path: Path) -> dict | None:
    """uns["stlib_velocity"] of an h5ad without reading its matrices; None if absent or unreadable."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return ad.io.read_elem(f[f"uns/{UNS_KEY}"]) if f"uns/{UNS_KEY}" in f else None
    except OSError:
        return None


def is_cached(in_path: str | Path, out_path: str | Path, params: dict) -> bool:
    """The output exists, is not older than the input, and this pipeline made it with the same parameters."""
    in_path, out_path = Path(in_path), Path(out_path)
    if not out_path.exists() or os.path.getmtime(out_path) < os.path.getmtime(in_path):
        return False
    stored = _cached_params(out_path)
    return bool(stored) and all(str(stored.get(k)) == str(v) for k, v in params.items())


def _read_matrix(group_or_dataset, rows: np.ndarray | None):
    """One h5ad matrix (sparse group or dense dataset), only `rows` of it: the other cells are never loaded."""
    import h5py

    if isinstance(group_or_dataset, h5py.Dataset):
        dense = ad.io.read_elem(group_or_dataset)  # whole, then rows: h5py's point selection is slow for many rows
        return dense if rows is None else dense[rows]
    matrix = ad.io.sparse_dataset(group_or_dataset)
    return matrix[:] if rows is None else matrix[rows]


def _read_inputs(path: Path, embed_key: str, mode: str, pert_col: str | None, control_pert: str | None):
    """What velocity reads of an h5ad and nothing else: both count layers and the embedding of the control rows,
    as scvelo's working copy. Returns (that AnnData, its basis, those rows or None for all, the file's cell count).

    Why: a 57k-cell study file holds X, other layers and embeddings that velocity never reads; loading them
    (4.6 GiB for the 57,298 x 3,000 benchmark study) set the command's memory floor."""
    import h5py

    with h5py.File(path, "r") as f:
        _check(f["layers"].keys() if "layers" in f else [], f["obsm"].keys() if "obsm" in f else [], embed_key, mode)
        obs = ad.io.read_elem(f["obs"])
        rows = _control_rows(obs, pert_col, control_pert)
        basis = _basis(embed_key)
        space = _read_matrix(f["X"] if embed_key == "X" else f[f"obsm/{embed_key}"], rows)
        work = _working_copy(_read_matrix(f["layers/spliced"], rows), _read_matrix(f["layers/unspliced"], rows),
                             _dense64(space), basis)
    return work, basis, rows, len(obs)


def _dict_group(f, name: str):
    """An h5ad's obsm or uns group, created as anndata encodes it when the file has none."""
    group = f.require_group(name)
    if "encoding-type" not in group.attrs:
        group.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
    return group


def _write_outputs(in_path: Path, out_path: Path, velocity: np.ndarray, confidence: np.ndarray, params: dict) -> None:
    """Copy the input file and add the velocity keys to the copy, then move it into place.

    Why not read, modify and rewrite the AnnData: that loads every matrix of the file. A crash mid-write never
    leaves a file the cache would trust (the copy is renamed only when complete); an existing velocity of the same
    shape is overwritten in place, so re-running does not grow the file."""
    import shutil

    import h5py

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    shutil.copyfile(in_path, tmp)
    with h5py.File(tmp, "a") as f:
        obsm = _dict_group(f, "obsm")
        key = velocity_key(params["embed_key"])
        if key in obsm and obsm[key].shape == velocity.shape and obsm[key].dtype == velocity.dtype:
            obsm[key][...] = velocity
        else:
            if key in obsm:
                del obsm[key]
            ad.io.write_elem(obsm, key, velocity)
        obs = ad.io.read_elem(f["obs"])
        obs[CONFIDENCE_KEY] = confidence
        del f["obs"]
        ad.io.write_elem(f, "obs", obs)
        uns = _dict_group(f, "uns")
        if UNS_KEY in uns:
            del uns[UNS_KEY]
        ad.io.write_elem(uns, UNS_KEY, params)
    os.replace(tmp, out_path)


def run_velocity(
    in_path: str | Path,
    embed_key: str = "X_state",
    out_path: str | Path | None = None,
    n_neighbors: int = 30,
    n_pcs: int = 30,
    mode: str = "stochastic",
    min_shared_counts: int = 20,
    n_jobs: int = 1,
    force: bool = False,
    pert_col: str | None = None,
    control_pert: str | None = None,
    n_top_genes: int | None = None,
) -> Path:
    """Read what velocity needs of an h5ad, add compute_velocity's keys to a copy of it; reuse a valid cached output.

    Default output: `<stem>.velocity.h5ad` beside the input. out_path may be the input itself (replaced
    atomically). force=True recomputes even when the cache is valid. Only the control cells' count layers and
    embedding are read (see _read_inputs); every other element of the file is copied unread."""
    in_path = Path(in_path)
    if not in_path.exists():
        raise VelocityError(f"input file not found: {in_path}")
    out_path = Path(out_path) if out_path is not None else default_output_path(in_path)
    params = _params(embed_key, mode, n_neighbors, n_pcs, pert_col, control_pert, n_top_genes)
    if not force and is_cached(in_path, out_path, params):
        return out_path
    work, basis, rows, n_cells = _read_inputs(in_path, embed_key, mode, pert_col, control_pert)
    v, conf = _velocity_in_place(work, basis, n_neighbors, n_pcs, mode, min_shared_counts, n_jobs, n_top_genes)
    del work
    velocity, confidence = _on_every_cell(rows, n_cells, v, conf)
    _write_outputs(in_path, out_path, velocity, confidence, params)
    return out_path
