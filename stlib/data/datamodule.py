"""Cell sets for the State Transition model: load, validate, group, sample, collate.

A training item is a *cell set*: S cells drawn from one group (dataset, cell type, perturbation[, batch]) of
one split, paired with S control cells of the same cell type — from the same batch when that batch has
controls, else from the same time point, else any — as State pairs them. Control groups are targets too
(control -> itself). Everything is checked in :meth:`PerturbationDataModule.setup`, before any training, and
every array is held in memory as contiguous float32, so a batch is a handful of integer-array gathers.

The sampling itself (groups, sets, collation) lives in :mod:`stlib.data.cellsets`.

Shapes: B sets per batch, S cells per set, D embedding dim, P perturbation encoding dim, G genes.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

from stlib.config import DataConfig
from stlib.data.cellsets import CellSetStore, FixedSets, Group, GroupSampler, RandomSets, draw_rows
from stlib.data.errors import DataError, listing
from stlib.data.maps import (
    BATCH_MAP_FILE,
    CELL_TYPE_MAP_FILE,
    PERT_MAP_FILE,
    load_map,
    load_torch_safely,
    save_map,
)
from stlib.data.splits import DATASET_COL, SPLITS, SplitConfig, load_split_config, split_masks

log = logging.getLogger(__name__)

__all__ = ["Group", "PerturbationDataModule", "SavedMaps", "draw_rows", "load_datasets", "load_maps",
           "read_perturbation_names"]

GENE_SPACES = ("gene", "all")  # output spaces that need gene-expression targets
SUMMARY_FILE = "data_summary.json"


@dataclass
class SavedMaps:
    pert: dict[str, int]
    cell_type: dict[str, int]
    batch: dict[str, int] | None


# --------------------------------------------------------------------------------------------- loading


def read_perturbation_names(data_cfg: DataConfig) -> list[str]:
    """The perturbations in the data, read from obs only (cheap): to build a map before setup()."""
    data_cfg.check_required()
    split_cfg = load_split_config(data_cfg.toml_config_path)
    names: set[str] = set()
    for dataset in split_cfg.datasets:
        for path in split_cfg.files(dataset):
            obs = _read_obs(path)
            if data_cfg.pert_col not in obs:
                raise DataError(f"obs column {data_cfg.pert_col!r} (data.pert_col) not in {path}; "
                                f"obs columns: {listing(obs.columns)}")
            names.update(obs[data_cfg.pert_col].astype(str).unique())
    return sorted(names)


def _read_obs(path: Path) -> pd.DataFrame:
    import h5py

    with h5py.File(path, "r") as fh:
        return ad.io.read_elem(fh["obs"])


def _missing(kind: str, key: str, what: str, existing, source: str, hint: str = "") -> DataError:
    return DataError(f"{kind} {key!r} ({what}) not found in {source}; {kind} there: {listing(existing)}{hint}")


def _validate_file(keys: dict[str, list[str]], cfg: DataConfig, need_velocity: bool, source: str) -> None:
    """Per-file key checks (`keys`: the file's obs columns, obsm and layer names), before anything large is read."""
    if cfg.embed_key != "X" and cfg.embed_key not in keys["obsm"]:
        raise _missing("obsm", cfg.embed_key, "data.embed_key", keys["obsm"], source, ' (or "X")')
    for col, what in ((cfg.pert_col, "data.pert_col"), (cfg.cell_type_key, "data.cell_type_key"),
                      (cfg.batch_col, "data.batch_col"), (cfg.time_col, "data.time_col")):
        if col is not None and col not in keys["obs"]:
            raise _missing("obs column", col, what, keys["obs"], source)
    if cfg.output_space in GENE_SPACES and cfg.gene_layer is not None and cfg.gene_layer not in keys["layers"]:
        raise _missing("layer", cfg.gene_layer, f"data.gene_layer, needed by output_space={cfg.output_space}",
                       keys["layers"], source, "; set data.gene_layer=null to use X")
    if need_velocity:
        hint = f"; run `stlib velocity {source} --embed-key {cfg.embed_key}` first"
        key = cfg.resolved_velocity_key
        if key not in keys["obsm"]:
            raise _missing("obsm", key, "velocity in the model's space", keys["obsm"], source, hint)
        if cfg.velocity_confidence_key not in keys["obs"]:
            raise _missing("obs column", cfg.velocity_confidence_key, "data.velocity_confidence_key",
                           keys["obs"], source, hint)


def read_needed(path: Path, cfg: DataConfig, need_velocity: bool = False) -> ad.AnnData:
    """The parts of an .h5ad a run reads — obs, var, the embedding, the gene matrix (where the output space has
    genes), the velocity (where asked) — and nothing else: a study's raw counts and spliced/unspliced layers, often
    most of the file, stay on disk. Sparse matrices stay sparse."""
    import h5py

    with h5py.File(path, "r") as fh:
        obs = ad.io.read_elem(fh["obs"])
        keys = {"obs": list(obs.columns), "obsm": list(fh["obsm"].keys()) if "obsm" in fh else [],
                "layers": list(fh["layers"].keys()) if "layers" in fh else []}
        _validate_file(keys, cfg, need_velocity, str(path))
        genes_needed = cfg.output_space in GENE_SPACES
        obsm = {} if cfg.embed_key == "X" else {cfg.embed_key: ad.io.read_elem(fh[f"obsm/{cfg.embed_key}"])}
        if need_velocity:
            obsm[cfg.resolved_velocity_key] = ad.io.read_elem(fh[f"obsm/{cfg.resolved_velocity_key}"])
        layers = {}
        if genes_needed and cfg.gene_layer is not None:
            layers[cfg.gene_layer] = ad.io.read_elem(fh[f"layers/{cfg.gene_layer}"])
        x = ad.io.read_elem(fh["X"]) if cfg.embed_key == "X" or (genes_needed and cfg.gene_layer is None) else None
        var = ad.io.read_elem(fh["var"])
    return ad.AnnData(X=x, obs=obs, var=var, obsm=obsm, layers=layers)


def load_datasets(split_cfg: SplitConfig, cfg: DataConfig, need_velocity: bool = False) -> ad.AnnData:
    """Every dataset of the TOML, checked file by file, concatenated with obs['dataset'] naming each cell's."""
    parts = []
    for name in split_cfg.datasets:
        for path in split_cfg.files(name):
            adata = read_needed(path, cfg, need_velocity)
            adata.obs[DATASET_COL] = name
            parts.append(adata)
    if len(parts) == 1:
        adata = parts[0]
    else:
        with warnings.catch_warnings():  # files often share obs names; made unique just below
            warnings.filterwarnings("ignore", message="Observation names are not unique")
            adata = ad.concat(parts, join="inner", merge="same", uns_merge="first")
        adata.obs_names_make_unique()
    adata.obs[DATASET_COL] = pd.Categorical(adata.obs[DATASET_COL], categories=list(split_cfg.datasets))
    return adata


def _dense_f32(x) -> np.ndarray:
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def _embedding(adata: ad.AnnData, cfg: DataConfig) -> np.ndarray:
    emb = _dense_f32(adata.X if cfg.embed_key == "X" else adata.obsm[cfg.embed_key])
    bad = int((~np.isfinite(emb).all(axis=1)).sum())
    if bad:
        raise DataError(f"embedding {cfg.embed_key!r} has NaN/inf in {bad} of {len(emb)} cells; fix or drop them")
    return emb


def _gene_matrix(adata: ad.AnnData, cfg: DataConfig):
    x = adata.X if cfg.gene_layer is None else adata.layers[cfg.gene_layer]
    if sp.issparse(x):  # kept sparse; rows are densified per batch
        return sp.csr_matrix(x, dtype=np.float32)
    return _dense_f32(x)


def _velocity(adata: ad.AnnData, cfg: DataConfig, dim: int) -> tuple[np.ndarray, np.ndarray]:
    vel = _dense_f32(adata.obsm[cfg.resolved_velocity_key])
    if vel.shape[1] != dim:
        raise DataError(f"obsm {cfg.resolved_velocity_key!r} is {vel.shape[1]}-d but the embedding "
                        f"{cfg.embed_key!r} is {dim}-d; velocity must live in the model's space")
    conf = np.asarray(adata.obs[cfg.velocity_confidence_key], dtype=np.float32).copy()
    bad = ~np.isfinite(vel).all(axis=1) | ~np.isfinite(conf)
    if bad.any():  # scvelo leaves NaN where it has no estimate: such cells get zero velocity and zero weight
        log.warning("%d cells have NaN/inf velocity or confidence; their velocity weight is set to 0", bad.sum())
        vel[bad] = 0.0
        conf[bad] = 0.0
    return vel, conf


def _load_features(path: str, perts: list[str]) -> dict[str, np.ndarray]:
    if not Path(path).is_file():
        raise DataError(f"data.perturbation_features_file {path} does not exist")
    raw = load_torch_safely(path)
    if not isinstance(raw, dict):
        raise DataError(f"{path} must hold a dict {{perturbation name: vector}}, got {type(raw).__name__}")
    feats = {str(k): np.asarray(torch.as_tensor(v), np.float32).reshape(-1) for k, v in raw.items()}
    missing = [p for p in perts if p not in feats]
    if missing:
        raise DataError(f"perturbation(s) {listing(missing)} have no vector in {path} ({len(feats)} names there)")
    dims = {feats[p].shape[0] for p in perts}
    if len(dims) > 1:
        raise DataError(f"vectors in {path} differ in length: {sorted(dims)}")
    return feats


# --------------------------------------------------------------------------------------------- groups


def _codes(values: pd.Series) -> tuple[np.ndarray, list]:
    codes, uniques = pd.factorize(values, sort=True)
    return codes.astype(np.int64), list(uniques)


def _time_value(times, code: int):
    return None if times is None or code < 0 else times[1][code]  # code -1: missing time


def _build_groups(frame: pd.DataFrame, masks: dict[str, np.ndarray], has_batch: bool, times) -> list[Group]:
    """Groups per split. With a time column, time is part of the key too, so every group has one time point
    (a no-op when batches, e.g. mice, each belong to one time point)."""
    keys = ["dataset", "cell_type", "pert"] + (["batch"] if has_batch else []) + (["time"] if times is not None else [])
    groups = []
    for split in SPLITS:
        rows = np.flatnonzero(masks[split])
        for key, local in frame.iloc[rows].groupby(keys, sort=True, observed=True).indices.items():
            groups.append(Group(dataset=key[0], cell_type=key[1], pert=key[2], batch=key[3] if has_batch else None,
                                time=_time_value(times, key[-1]), obs_indices=rows[local].astype(np.int64),
                                split=split, gid=len(groups)))
    return groups


def _attach_basal(groups: list[Group], frame: pd.DataFrame, control: np.ndarray, times) -> None:
    """Basal pool per group: controls of its cell type (same dataset), same batch if that batch has
    controls, else same time point, else all; a cell type without controls in its dataset borrows them
    from other datasets."""
    ctrl = frame.iloc[np.flatnonzero(control)].copy()
    ctrl["row"] = np.flatnonzero(control)
    pools = {}
    for keys in (("dataset", "cell_type", "batch"), ("dataset", "cell_type", "time"), ("dataset", "cell_type"),
                 ("cell_type",)):
        for key, local in ctrl.groupby(list(keys), sort=False, observed=True).indices.items():
            pools[(keys, key if isinstance(key, tuple) else (key,))] = ctrl["row"].to_numpy()[local]
    lacking = []
    for g in groups:
        time_code = frame["time"].iat[g.obs_indices[0]] if g.time is not None else None
        candidates = [
            (("dataset", "cell_type", "batch"), (g.dataset, g.cell_type, g.batch)),
            (("dataset", "cell_type", "time"), (g.dataset, g.cell_type, time_code)),
            (("dataset", "cell_type"), (g.dataset, g.cell_type)),
            (("cell_type",), (g.cell_type,)),
        ]
        pool = next((pools[c] for c in candidates if c in pools), None)
        if pool is None:
            lacking.append(g.name)
        else:
            g.basal_indices = pool.astype(np.int64)
    if lacking:
        raise DataError(f"no control cells for group(s) {listing(lacking)}: every cell type needs controls "
                        "(data.control_pert) to draw basal cells from")


def _check_small(groups: list[Group], set_len: int, policy: str) -> None:
    small = [f"{g.split} {g.name} ({g.size} cells)" for g in groups if g.size < set_len]
    small += [f"{g.split} {g.name}: basal pool ({len(g.basal_indices)} controls)"
              for g in groups if len(g.basal_indices) < set_len]
    if not small:
        return
    if policy == "error":
        raise DataError(f"{len(small)} group(s) are smaller than cell_set_len={set_len}: {listing(small, 10)}; "
                        "set data.small_group=replace or a smaller model.cell_set_len")
    log.warning("%d group(s) smaller than cell_set_len=%d are sampled with replacement: %s",
                len(small), set_len, listing(small, 10))


# --------------------------------------------------------------------------------------------- module


class PerturbationDataModule(L.LightningDataModule):
    """State-style cell-set data. Call :meth:`setup` once (idempotent) to load and validate everything."""

    def __init__(self, data_cfg: DataConfig, cell_set_len: int, batch_size: int, *,
                 pert_map: dict[str, int] | None = None, need_velocity: bool = False, seed: int = 0):
        super().__init__()
        if cell_set_len < 1 or batch_size < 1:
            raise DataError(f"cell_set_len and batch_size must be >= 1, got {cell_set_len} and {batch_size}")
        data_cfg.check_required()
        self.data_cfg, self.cell_set_len, self.batch_size = data_cfg, cell_set_len, batch_size
        self.need_velocity, self.seed = need_velocity, seed
        self._given_pert_map = dict(pert_map) if pert_map is not None else None
        self.start_step = 0  # set on resume: the training stream continues at this step
        self.train_batches: int | None = None  # batches per training epoch; None = one pass over the data
        self.pin_memory = False  # page-locked batches copy to a GPU asynchronously; set when training on one
        self._store: CellSetStore | None = None

    # ---------------------------------------------------------------- setup

    def setup(self, stage: str | None = None) -> None:
        if self._store is not None:
            return
        cfg = self.data_cfg
        split_cfg = load_split_config(cfg.toml_config_path)
        adata = load_datasets(split_cfg, cfg, self.need_velocity)
        obs = adata.obs
        pert = obs[cfg.pert_col].astype(str).to_numpy()
        if cfg.control_pert not in set(pert):
            raise DataError(f"control {cfg.control_pert!r} (data.control_pert) is not a value of obs "
                            f"{cfg.pert_col!r}; values there: {listing(pert)}")
        masks = split_masks(obs, split_cfg, cfg)

        embed = _embedding(adata, cfg)
        genes = _gene_matrix(adata, cfg) if cfg.output_space in GENE_SPACES else None
        velocity, confidence = _velocity(adata, cfg, embed.shape[1]) if self.need_velocity else (None, None)

        perts_in_data = sorted(set(pert))
        self._pert_map = self._resolve_pert_map(perts_in_data)
        cell_types = obs[cfg.cell_type_key].astype(str)
        self._cell_type_map = {c: i for i, c in enumerate(sorted(cell_types.unique()))}
        frame = pd.DataFrame({"dataset": obs[DATASET_COL].astype(str).to_numpy(), "cell_type": cell_types.to_numpy(),
                              "pert": pert})
        if cfg.batch_col is not None:
            batch_codes, batch_names = _codes(obs[cfg.batch_col].astype(str))
            self._batch_map = {b: i for i, b in enumerate(batch_names)}
            frame["batch"] = obs[cfg.batch_col].astype(str).to_numpy()
        else:
            batch_codes, self._batch_map = np.zeros(len(obs), np.int64), None
            frame["batch"] = ""
        times = _codes(obs[cfg.time_col]) if cfg.time_col is not None else None
        frame["time"] = times[0] if times is not None else -1
        self._time_values = [str(t) for t in times[1]] if times is not None else None

        groups = _build_groups(frame, masks, cfg.batch_col is not None, times)
        _attach_basal(groups, frame, pert == cfg.control_pert, times)
        _check_small(groups, self.cell_set_len, cfg.small_group)

        if cfg.perturbation_features_file:
            feats = _load_features(cfg.perturbation_features_file, perts_in_data)
            group_vec = np.stack([feats[g.pert] for g in groups]) if groups else np.zeros((0, 0), np.float32)
            self._pert_dim = int(feats[perts_in_data[0]].shape[0])
        else:
            self._pert_dim = max(self._pert_map.values()) + 1
            group_vec = np.eye(self._pert_dim, dtype=np.float32)[[self._pert_map[g.pert] for g in groups]]
        self._store = CellSetStore(
            embed=embed, genes=genes, velocity=velocity, confidence=confidence, batch_codes=batch_codes,
            groups=groups, group_pert_vec=np.ascontiguousarray(group_vec, np.float32),
            group_pert_index=np.array([self._pert_map[g.pert] for g in groups], np.int64),
            group_cell_type_index=np.array([self._cell_type_map[g.cell_type] for g in groups], np.int64),
            cell_set_len=self.cell_set_len,
            group_is_control=np.array([g.pert == cfg.control_pert for g in groups], bool),
            group_time_index=(np.array([frame["time"].iat[g.obs_indices[0]] for g in groups], np.int64)
                              if times is not None else None),
        )
        self._adata, self._masks, self._split_cfg = adata, masks, split_cfg
        labels = np.full(len(obs), "none", dtype=object)
        for split in SPLITS:
            labels[masks[split]] = split
        self._labels = labels.astype(str)
        if not self.groups("train") and stage in (None, "fit"):
            log.warning("the train split is empty: check [training] in %s", split_cfg.path)

    def _resolve_pert_map(self, perts_in_data: list[str]) -> dict[str, int]:
        if self._given_pert_map is not None:
            missing = [p for p in perts_in_data if p not in self._given_pert_map]
            if missing:
                raise DataError(f"perturbation(s) {listing(missing)} are in the data but not in the given pert_map "
                                f"(names there: {listing(self._given_pert_map)})")
            return dict(self._given_pert_map)
        control = self.data_cfg.control_pert
        order = [control] + [p for p in perts_in_data if p != control]
        return {p: i for i, p in enumerate(order)}

    # ---------------------------------------------------------------- properties

    def _after_setup(self, attr: str):
        if self._store is None:
            raise RuntimeError("PerturbationDataModule.setup() has not been called")
        return getattr(self, attr)

    @property
    def store(self) -> CellSetStore:
        return self._after_setup("_store")

    @property
    def adata(self) -> ad.AnnData:
        """The concatenated AnnData (obs['dataset'] names each cell's dataset)."""
        return self._after_setup("_adata")

    @property
    def split_config(self) -> SplitConfig:
        """The parsed split TOML (its ``setting`` says what the held-out splits test)."""
        return self._after_setup("_split_cfg")

    @property
    def split_labels(self) -> np.ndarray:
        """'train' / 'val' / 'test' / 'none' per cell (test wins where fewshot val and test overlap)."""
        return self._after_setup("_labels")

    @property
    def pert_map(self) -> dict[str, int]:
        return self._after_setup("_pert_map")

    @property
    def cell_type_map(self) -> dict[str, int]:
        return self._after_setup("_cell_type_map")

    @property
    def batch_map(self) -> dict[str, int] | None:
        return self._after_setup("_batch_map")

    @property
    def pert_dim(self) -> int:
        return self._after_setup("_pert_dim")

    @property
    def input_dim(self) -> int:
        return int(self.store.embed.shape[1])

    @property
    def gene_dim(self) -> int | None:
        return None if self.store.genes is None else int(self.store.genes.shape[1])

    def train_cell_chunks(self, chunk: int = 8192):
        """(embedding [n, D], dense expression [n, G]) of the training cells, `chunk` cells at a time: what a new
        gene decoder is fitted on, without densifying a large study's expression at once."""
        genes = self.store.genes
        if genes is None:
            raise DataError("no gene expression here (data.output_space=embedding): nothing to read out")
        rows = np.flatnonzero(self.split_labels == "train")
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            x = genes[part]
            yield self.store.embed[part], (x.toarray() if sp.issparse(x) else np.asarray(x))

    @property
    def gene_names(self) -> list[str]:
        return list(self.adata.var_names)

    @property
    def time_values(self) -> list[str] | None:
        """The time points (data.time_col) in code order, as strings; None without a time column."""
        return self._after_setup("_time_values")

    @property
    def n_batches(self) -> int | None:
        return None if self.batch_map is None else len(self.batch_map)

    def groups(self, split: str) -> list[Group]:
        if split not in SPLITS:
            raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        return [g for g in self.store.groups if g.split == split]

    def make_sets(self, group: Group | int, n_sets: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """n_sets cell sets of one group, collated like a training batch."""
        return self.store.make_sets(group, n_sets, rng)

    # ---------------------------------------------------------------- loaders

    def epoch_sets(self) -> int:
        """Sets per training epoch: sum over train groups of ceil(size / S)."""
        return sum(math.ceil(g.size / self.cell_set_len) for g in self.groups("train"))

    def train_dataloader(self) -> DataLoader:
        groups = self.groups("train")
        if not groups:
            raise DataError(f"no training cells: [training] in {self._split_cfg.path} selects nothing")
        n_batches = self.train_batches or math.ceil(self.epoch_sets() / self.batch_size)
        sizes = np.zeros(len(self.store.groups))
        sizes[[g.gid for g in groups]] = [g.size for g in groups]
        rank, world = self.rank_and_world()
        sampler = GroupSampler(sizes, self.batch_size * world, n_batches, self.seed, self.start_step)
        return DataLoader(RandomSets(self.store, n_batches, rank, world), batch_size=None, sampler=sampler,
                          num_workers=self.data_cfg.num_workers, persistent_workers=self.data_cfg.num_workers > 0,
                          pin_memory=self.pin_memory)

    def rank_and_world(self) -> tuple[int, int]:
        """This process's rank and the number of data-parallel processes (0, 1 outside a distributed Trainer);
        batch_size is per process, as in Lightning."""
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _fixed_loader(self, split: str) -> DataLoader:
        sets = FixedSets(self.store, [g.gid for g in self.groups(split)], self.data_cfg.sets_per_group,
                          self.batch_size, self.seed)
        return DataLoader(sets, batch_size=None, shuffle=False, num_workers=self.data_cfg.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._fixed_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._fixed_loader("test")

    # ---------------------------------------------------------------- maps

    def summary(self) -> dict:
        return {
            "cells": {s: int(self._masks[s].sum()) for s in SPLITS} | {"total": int(self.adata.n_obs)},
            "groups_per_split": {s: len(self.groups(s)) for s in SPLITS},
            "dims": {"input_dim": self.input_dim, "pert_dim": self.pert_dim, "gene_dim": self.gene_dim,
                     "n_batches": self.n_batches, "n_cell_types": len(self.cell_type_map)},
            "cell_set_len": self.cell_set_len,
            "groups": [{"split": g.split, "dataset": g.dataset, "cell_type": g.cell_type, "pert": g.pert,
                        "batch": g.batch, "time": None if g.time is None else str(g.time), "n_cells": g.size,
                        "n_basal": len(g.basal_indices)} for g in self.store.groups],
        }

    def save_maps(self, run_dir: str | Path) -> None:
        """State's map files (pert/cell type/batch one-hot dicts) and data_summary.json into run_dir."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_map(self.pert_map, run_dir / PERT_MAP_FILE, dim=max(self.pert_map.values()) + 1)
        save_map(self.cell_type_map, run_dir / CELL_TYPE_MAP_FILE)
        if self.batch_map is not None:
            save_map(self.batch_map, run_dir / BATCH_MAP_FILE)
        (run_dir / SUMMARY_FILE).write_text(json.dumps(self.summary(), indent=1))

    @staticmethod
    def load_maps(run_dir: str | Path) -> SavedMaps:
        return load_maps(run_dir)


def load_maps(run_dir: str | Path) -> SavedMaps:
    """Read the maps :meth:`PerturbationDataModule.save_maps` (or State) wrote."""
    run_dir = Path(run_dir)
    if not (run_dir / PERT_MAP_FILE).is_file():
        raise DataError(f"{run_dir} has no {PERT_MAP_FILE}; is it a run dir?")
    batch = run_dir / BATCH_MAP_FILE
    return SavedMaps(pert=load_map(run_dir / PERT_MAP_FILE), cell_type=load_map(run_dir / CELL_TYPE_MAP_FILE),
                     batch=load_map(batch) if batch.is_file() else None)
