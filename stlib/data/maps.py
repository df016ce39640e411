"""Name -> index maps for perturbations, cell types and batches, saved the way State saves them.

State writes each map as ``torch.save({name: one_hot_tensor})`` (``pert_onehot_map.pt``,
``cell_type_onehot_map.torch``, ``batch_onehot_map.torch``). We write the same files so a run dir
looks familiar, and read State's files without unpickling arbitrary objects: only the numpy scalar
types State's keys use are allow-listed.

A map may alias several names onto one index (a fine-tuning experiment's control mapped onto the
base model's control), so one-hot vectors are built from indices, not from dict order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stlib.constants import BATCH_MAP_FILE, CELL_TYPE_MAP_FILE, PERT_MAP_FILE

__all__ = ["BATCH_MAP_FILE", "CELL_TYPE_MAP_FILE", "PERT_MAP_FILE"]


def _safe_globals() -> list:
    types = [np.str_, np.dtype, np.ndarray, np.dtypes.StrDType] if hasattr(np, "dtypes") else [np.str_]
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    return types + [_reconstruct, scalar]


def load_torch_safely(path: str | Path, map_location="cpu"):
    """torch.load with weights_only=True, allowing only the numpy scalar types State's maps contain."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def onehot_to_index(onehot_map: dict) -> dict[str, int]:
    """{name: one-hot tensor} -> {name: index}. Plain {name: int} passes through."""
    out = {}
    for name, vec in onehot_map.items():
        if isinstance(vec, int):
            out[str(name)] = vec
        else:
            out[str(name)] = int(torch.as_tensor(vec).argmax())
    return out


def index_to_onehot(index_map: dict[str, int], dim: int | None = None) -> dict[str, torch.Tensor]:
    dim = dim if dim is not None else (max(index_map.values()) + 1 if index_map else 0)
    eye = torch.eye(dim)
    return {name: eye[i].clone() for name, i in index_map.items()}


def save_map(index_map: dict[str, int], path: str | Path, dim: int | None = None) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(index_to_onehot(index_map, dim), path)


def load_map(path: str | Path) -> dict[str, int]:
    """Read a State or stlib map file -> {name: index}."""
    return onehot_to_index(load_torch_safely(path))
