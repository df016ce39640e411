"""The demo's data as a fine-tune sees it, for the analysis scripts: stlib's DataModule, groups and real shifts.

A *group* is stlib's (:class:`stlib.data.cellsets.Group`): the cells of one split, cell type, perturbation, mouse
and day; its basal pool is the controls of its cell type and day (a Burn mouse has no Sham cells). A group's
real shift is its mean minus that pool's mean, in any per-cell matrix (embedding, genes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stlib.config import load_config
from stlib.data.cellsets import Group
from stlib.data.datamodule import PerturbationDataModule
from stlib.evaluate.baselines import pooled_shifts, train_group_shifts
from stlib.evaluate.layout import mean_rows

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "wound_healing.h5ad"  # what `make demo` writes (with velocity, after `stlib velocity`)


def load_study(data: str | Path = DATA) -> PerturbationDataModule:
    """configs/finetune.yaml's data settings on the split TOML beside ``data`` (named as make-data names it)."""
    toml = Path(data).with_suffix(".toml")
    cfg = load_config(REPO / "configs" / "finetune.yaml", [f"data.toml_config_path={toml}"])
    dm = PerturbationDataModule(cfg.data, cell_set_len=1, batch_size=1)  # set length 1: no small-group warnings
    dm.setup()
    return dm


def perturbed_groups(dm: PerturbationDataModule, split: str) -> list[Group]:
    return [g for g in dm.groups(split) if g.pert != dm.data_cfg.control_pert]


def cell_types(dm: PerturbationDataModule, split: str) -> list[str]:
    return sorted({g.cell_type for g in perturbed_groups(dm, split)})


def group_shift(matrix, group: Group) -> np.ndarray:
    """[G] real shift of one group: its mean minus its basal pool's mean (float64)."""
    return mean_rows(matrix, group.obs_indices) - mean_rows(matrix, group.basal_indices)


def train_type_shifts(dm: PerturbationDataModule, matrix) -> dict[str, np.ndarray]:
    """Training cell type -> the mean over its time points of its training shifts; one perturbation (Burn) assumed."""
    groups = train_group_shifts(dm, {"m": matrix})
    if len(set(groups["pert"])) != 1:
        raise ValueError("train_type_shifts expects exactly one perturbation besides the control")
    return {ct: groups["m"][groups["cell_type"] == ct].mean(axis=0) for ct in np.unique(groups["cell_type"])}


def train_mean_shift(dm: PerturbationDataModule, matrix) -> np.ndarray:
    """[G] the mean-shift baseline's shift: the mean over training groups (cell type x time) of their shifts."""
    shifts = pooled_shifts(train_group_shifts(dm, {"m": matrix}), "m")
    if len(shifts) != 1:
        raise ValueError("train_mean_shift expects exactly one perturbation besides the control")
    return next(iter(shifts.values()))