"""State-style TOML split files: which cells train, which validate, which are held out for test.

The file format is the one State's data loader reads, so an existing State TOML works unchanged::

    [datasets]                       # name -> .h5ad file, or a folder (all of its .h5ad files)
    burn_sham = "burn_sham.h5ad"     # relative paths are resolved against the TOML's folder
    [training]                       # every dataset listed here trains ...
    burn_sham = "train"
    [zeroshot]                       # ... except whole cell types sent to val/test (controls included)
    "burn_sham.Fibroblast" = "test"
    [fewshot."burn_sham.Keratinocyte"]   # ... and listed perturbations of a cell type (val and test may overlap)
    val = ["Burn"]
    test = ["Burn"]
    [heldout_batches]                # stlib's extension (State has no such section): whole batches held out,
    "burn_sham.M12" = "test"         # "dataset.<value of data.batch_col>" = val | test, e.g. unseen mice

Rules (our reading of State's semantics): cell types not named under [zeroshot]/[fewshot] of a training
dataset train; a fewshot cell type keeps its controls and unlisted perturbations in train; cells of a
dataset not under [training] are used only where [zeroshot]/[fewshot] name them ("none" otherwise); every
cell of a batch under [heldout_batches] goes to that split (controls included, as [zeroshot] does for cell types),
applied last. A held-out mouse's perturbed cells are predicted from controls of the same cell type and time point.
Controls stay usable as basal cells by every split: the sampler draws basal cells from the controls of a
group's cell type wherever their own label puts them.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from stlib.config import DataConfig
from stlib.data.errors import DataError, listing

SPLITS = ("train", "val", "test")
UNUSED = "none"  # label of cells no split uses (a dataset outside [training], not named elsewhere)
DATASET_COL = "dataset"  # obs column naming each cell's dataset after concatenation
_SECTIONS = ("datasets", "training", "zeroshot", "fewshot", "heldout_batches")
_HELD_OUT = ("val", "test")


@dataclass(frozen=True)
class SplitConfig:
    """A parsed split TOML. Keys of zeroshot/fewshot are (dataset, cell type) pairs."""

    path: Path
    datasets: dict[str, Path]  # name -> file or folder (absolute)
    training: dict[str, str]  # name -> "train"
    zeroshot: dict[tuple[str, str], str] = field(default_factory=dict)  # (dataset, cell type) -> val | test
    fewshot: dict[tuple[str, str], dict[str, list[str]]] = field(default_factory=dict)  # -> {val: [...], test: [...]}
    heldout_batches: dict[tuple[str, str], str] = field(default_factory=dict)  # (dataset, batch) -> val | test

    @property
    def setting(self) -> str:
        """What the held-out splits test: "unseen_mouse" (whole batches held out) or "unseen_cell_type"."""
        return "unseen_mouse" if self.heldout_batches else "unseen_cell_type"

    def files(self, name: str) -> list[Path]:
        """The .h5ad files behind one dataset name (a folder means all of its .h5ad files, sorted)."""
        path = self.datasets[name]
        return sorted(path.glob("*.h5ad")) if path.is_dir() else [path]


# --------------------------------------------------------------------------------------------- loading


def _read_toml(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"split TOML not found: {path} (data.toml_config_path)")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"malformed split TOML {path}: {exc}") from None


def _section(raw: dict, name: str, path: Path) -> dict:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise DataError(f"[{name}] in {path} must be a table, got {type(value).__name__}")
    return value


def _resolve_dataset(name: str, value, path: Path) -> Path:
    if not isinstance(value, str):
        raise DataError(f"[datasets] {name} in {path} must be a path string, got {value!r}")
    target = Path(value).expanduser()
    target = target if target.is_absolute() else (path.parent / target)
    target = target.resolve()
    if not target.exists():
        raise DataError(f"dataset {name!r} in {path}: {target} does not exist (file or folder of .h5ad expected)")
    if target.is_dir() and not any(target.glob("*.h5ad")):
        raise DataError(f"dataset {name!r} in {path}: folder {target} holds no .h5ad files")
    return target


def _split_key(key: str, datasets: dict[str, Path], section: str, path: Path) -> tuple[str, str]:
    """'dataset.celltype' -> (dataset, celltype); the longest dataset name that prefixes the key wins,
    so cell types (and dataset names) may themselves contain dots."""
    matches = [d for d in datasets if key.startswith(d + ".") and len(key) > len(d) + 1]
    if not matches:
        raise DataError(
            f"[{section}] key {key!r} in {path} must be 'dataset.celltype' with a dataset from [datasets]; "
            f"datasets: {listing(datasets)}"
        )
    dataset = max(matches, key=len)
    return dataset, key[len(dataset) + 1:]


def _perturbation_list(key: str, split: str, value, path: Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f'[fewshot."{key}"] {split} in {path} must be a list of perturbation names, got {value!r}')
    return list(value)


def load_split_config(toml_path: str | Path) -> SplitConfig:
    """Read and check a split TOML (paths, dataset names, split values); cell types are checked later,
    against the data, by :func:`assign_splits`."""
    path = Path(toml_path).expanduser().resolve()
    raw = _read_toml(path)
    unknown = set(raw) - set(_SECTIONS)
    if unknown:
        raise DataError(f"unknown section(s) {listing(unknown)} in {path}; expected {listing(_SECTIONS)}")
    datasets = {name: _resolve_dataset(name, value, path) for name, value in _section(raw, "datasets", path).items()}
    if not datasets:
        raise DataError(f"{path} lists no [datasets]")

    training = {}
    for name, value in _section(raw, "training", path).items():
        if name not in datasets:
            raise DataError(
                f"[training] names dataset {name!r} not in [datasets] of {path}; known: {listing(datasets)}"
            )
        if value != "train":
            raise DataError(f"[training] {name} = {value!r} in {path}; expected \"train\"")
        training[name] = value

    zeroshot = {}
    for key, value in _section(raw, "zeroshot", path).items():
        pair = _split_key(key, datasets, "zeroshot", path)
        if value not in _HELD_OUT:
            raise DataError(f'[zeroshot] "{key}" = {value!r} in {path}; expected "val" or "test"')
        zeroshot[pair] = value

    fewshot = {}
    for key, value in _section(raw, "fewshot", path).items():
        pair = _split_key(key, datasets, "fewshot", path)
        if not isinstance(value, dict):
            raise DataError(f'[fewshot] "{key}" in {path} must be a table with val/test lists, got {value!r}')
        bad = set(value) - set(_HELD_OUT)
        if bad:
            raise DataError(f'[fewshot."{key}"] in {path} has split(s) {listing(bad)}; expected "val" and/or "test"')
        if pair in zeroshot:
            raise DataError(f'cell type "{key}" is under both [zeroshot] and [fewshot] in {path}; choose one')
        fewshot[pair] = {split: _perturbation_list(key, split, value.get(split, []), path) for split in _HELD_OUT}

    heldout_batches = {}
    for key, value in _section(raw, "heldout_batches", path).items():
        pair = _split_key(key, datasets, "heldout_batches", path)
        if value not in _HELD_OUT:
            raise DataError(f'[heldout_batches] "{key}" = {value!r} in {path}; expected "val" or "test"')
        heldout_batches[pair] = value

    if not training and not zeroshot and not fewshot:
        raise DataError(f"{path} assigns nothing: add a [training] entry (e.g. {next(iter(datasets))} = \"train\")")
    return SplitConfig(path=path, datasets=datasets, training=training, zeroshot=zeroshot, fewshot=fewshot,
                       heldout_batches=heldout_batches)


# --------------------------------------------------------------------------------------------- assignment


def _dataset_column(obs: pd.DataFrame, split_cfg: SplitConfig) -> np.ndarray:
    if DATASET_COL in obs:
        values = obs[DATASET_COL].astype(str).to_numpy()
        unknown = set(values) - set(split_cfg.datasets)
        if unknown:
            raise DataError(f"obs[{DATASET_COL!r}] has dataset(s) {listing(unknown)} not in {split_cfg.path}")
        return values
    if len(split_cfg.datasets) == 1:
        return np.full(len(obs), next(iter(split_cfg.datasets)), dtype=object)
    raise DataError(f"obs needs a {DATASET_COL!r} column to tell the datasets of {split_cfg.path} apart")


def _check_cell_type(dataset: str, cell_type: str, section: str, cell_types: dict[str, set], path: Path) -> None:
    if cell_type not in cell_types.get(dataset, set()):
        raise DataError(
            f'[{section}] "{dataset}.{cell_type}" in {path}: cell type {cell_type!r} does not exist in dataset '
            f"{dataset!r}; cell types there: {listing(cell_types.get(dataset, ()))}"
        )


def split_masks(obs: pd.DataFrame, split_cfg: SplitConfig, data_cfg: DataConfig) -> dict[str, np.ndarray]:
    """{split: bool mask per cell}. Fewshot val and test lists may overlap, so a cell can be in both."""
    for col in (data_cfg.cell_type_key, data_cfg.pert_col):
        if col not in obs:
            raise DataError(f"obs column {col!r} not found; obs columns: {listing(obs.columns)}")
    dataset = _dataset_column(obs, split_cfg)
    cell_type = obs[data_cfg.cell_type_key].astype(str).to_numpy()
    pert = obs[data_cfg.pert_col].astype(str).to_numpy()
    cell_types = pd.DataFrame({"d": dataset, "c": cell_type}).groupby("d")["c"].unique().map(set).to_dict()

    train = np.isin(dataset, list(split_cfg.training))
    masks = {"train": train, "val": np.zeros(len(obs), bool), "test": np.zeros(len(obs), bool)}
    path = split_cfg.path

    for (ds, ct), split in split_cfg.zeroshot.items():
        _check_cell_type(ds, ct, "zeroshot", cell_types, path)
        here = (dataset == ds) & (cell_type == ct)
        masks["train"] &= ~here
        masks[split] |= here

    for (ds, ct), lists in split_cfg.fewshot.items():
        _check_cell_type(ds, ct, "fewshot", cell_types, path)
        here = (dataset == ds) & (cell_type == ct)
        present = set(pert[here])
        masks["train"] |= here  # controls and unlisted perturbations train, even outside [training]
        for split, perts in lists.items():
            missing = [p for p in perts if p not in present]
            if missing:
                raise DataError(
                    f'[fewshot."{ds}.{ct}"] {split} in {path}: perturbation(s) {listing(missing)} not found in that '
                    f"cell type; perturbations there: {listing(present)}"
                )
            if data_cfg.control_pert in perts:
                raise DataError(
                    f'[fewshot."{ds}.{ct}"] {split} in {path} lists the control {data_cfg.control_pert!r}; controls '
                    "are basal cells for every split — hold out a whole cell type with [zeroshot] instead"
                )
            held = here & np.isin(pert, perts)
            masks["train"] &= ~held
            masks[split] |= held

    if split_cfg.heldout_batches:
        if not data_cfg.batch_col or data_cfg.batch_col not in obs:
            raise DataError(f"[heldout_batches] in {path} holds out values of data.batch_col, which is "
                            f"{data_cfg.batch_col!r}" + ("" if not data_cfg.batch_col else
                                                         f"; obs columns: {listing(obs.columns)}"))
        batch = obs[data_cfg.batch_col].astype(str).to_numpy()
        batches = pd.DataFrame({"d": dataset, "b": batch}).groupby("d")["b"].unique().map(set).to_dict()
        for (ds, b), split in split_cfg.heldout_batches.items():
            if b not in batches.get(ds, set()):
                raise DataError(f'[heldout_batches] "{ds}.{b}" in {path}: {data_cfg.batch_col} = {b!r} does not '
                                f"exist in dataset {ds!r}; values there: {listing(batches.get(ds, ()))}")
            here = (dataset == ds) & (batch == b)
            masks["train"] &= ~here
            masks[split] |= here
    return masks


def assign_splits(obs: pd.DataFrame, split_cfg: SplitConfig, data_cfg: DataConfig) -> np.ndarray:
    """One label per cell: "train", "val", "test" or "none". A fewshot perturbation listed under both
    val and test is labelled "test" here; :func:`split_masks` keeps both memberships."""
    masks = split_masks(obs, split_cfg, data_cfg)
    labels = np.full(len(obs), UNUSED, dtype=object)
    for split in SPLITS:  # later wins: test over val over train
        labels[masks[split]] = split
    return labels.astype(str)
