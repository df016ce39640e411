"""Cell sets: groups of cells, drawing S-cell sets from them, and collating sets into batches.

A group is the cells of one split sharing dataset, cell type, perturbation (batch, time point); each has a
pool of control rows to draw basal cells from. :class:`CellSetStore` holds every array in memory as
contiguous float32 and builds a batch with a few integer-array gathers — no per-cell Python.

Shapes: B sets per batch, S cells per set, D embedding dim, P perturbation encoding dim, G genes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import Dataset, Sampler


@dataclass(eq=False)
class Group:
    """Cells of one split sharing dataset, cell type, perturbation (batch, time point); one prediction each."""

    dataset: str
    cell_type: str
    pert: str
    batch: str | None  # None without data.batch_col
    time: object  # the group's time point (a value of data.time_col); None without one
    obs_indices: np.ndarray  # int64 rows of the concatenated AnnData
    split: str = "train"
    basal_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)  # control rows
    gid: int = -1  # position in the store (the batch's group_index)

    @property
    def size(self) -> int:
        return len(self.obs_indices)

    @property
    def name(self) -> str:
        parts = [self.dataset, self.cell_type, self.pert]
        if self.batch is not None:
            parts.append(self.batch)
        elif self.time is not None:  # without batches, time tells groups apart
            parts.append(f"t={self.time}")
        return "/".join(parts)


def draw_rows(pool: np.ndarray, n_sets: int, set_len: int, rng: np.random.Generator) -> np.ndarray:
    """[n_sets, set_len] rows from pool: without replacement when the pool is large enough; otherwise every
    row once plus random repeats, so a small group is always used whole."""
    n = len(pool)
    if n >= set_len:
        pick = np.stack([rng.choice(n, set_len, replace=False) for _ in range(n_sets)]) if n_sets > 1 else \
            rng.choice(n, set_len, replace=False)[None]
    else:
        whole = np.broadcast_to(np.arange(n), (n_sets, n))
        pick = rng.permuted(np.concatenate([whole, rng.integers(n, size=(n_sets, set_len - n))], axis=1), axis=1)
    return pool[pick]


class CellSetStore:
    """Arrays and groups; draws and collates sets. Holds no AnnData, so DataLoader workers copy little."""

    def __init__(self, *, embed, genes, velocity, confidence, batch_codes, groups, group_pert_vec,
                 group_pert_index, group_cell_type_index, cell_set_len, group_time_index=None,
                 group_is_control=None):
        self.embed = embed  # [N, D] float32
        self.genes = genes  # [N, G] float32 (dense or CSR) or None
        self.velocity = velocity  # [N, D] float32 or None
        self.confidence = confidence  # [N] float32 or None
        self.batch_codes = batch_codes  # [N] int64
        self.groups: list[Group] = groups
        self.group_pert_vec = group_pert_vec  # [n_groups, P] float32
        self.group_pert_index = group_pert_index  # [n_groups] int64
        self.group_cell_type_index = group_cell_type_index  # [n_groups] int64
        self.group_time_index = group_time_index  # [n_groups] int64 (code of the time point) or None
        self.cell_set_len = cell_set_len
        # [n_groups] bool: the group's cells are controls (a control -> control set, whose ideal shift is ~0)
        self.group_is_control = (np.zeros(len(groups), bool) if group_is_control is None
                                 else np.asarray(group_is_control, bool))

    def draw(self, gid: int, n_sets: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(target rows, basal rows), each [n_sets, S]."""
        group = self.groups[gid]
        target = draw_rows(group.obs_indices, n_sets, self.cell_set_len, rng)
        basal = draw_rows(group.basal_indices, n_sets, self.cell_set_len, rng)
        return target, basal

    def collate(self, gids, target_idx: np.ndarray, basal_idx: np.ndarray) -> dict[str, torch.Tensor]:
        gids = np.asarray(gids, dtype=np.int64)
        n_sets, set_len = target_idx.shape
        pert = self.group_pert_vec[gids][:, None, :]
        out = {
            "basal": torch.from_numpy(self.embed[basal_idx]),
            "target": torch.from_numpy(self.embed[target_idx]),
            "pert": torch.from_numpy(np.ascontiguousarray(np.broadcast_to(pert, (n_sets, set_len, pert.shape[-1])))),
            "pert_index": torch.from_numpy(self.group_pert_index[gids]),
            "cell_type_index": torch.from_numpy(self.group_cell_type_index[gids]),
            "batch_index": torch.from_numpy(self.batch_codes[basal_idx]),
            "basal_obs_index": torch.from_numpy(basal_idx.astype(np.int64, copy=False)),
            "target_obs_index": torch.from_numpy(target_idx.astype(np.int64, copy=False)),
            "group_index": torch.from_numpy(gids),
            "control_set": torch.from_numpy(self.group_is_control[gids]),
        }
        if self.group_time_index is not None:
            out["time_index"] = torch.from_numpy(self.group_time_index[gids])  # [B]: one time point per set
        if self.genes is not None:
            rows = self.genes[target_idx.ravel()]
            rows = rows.toarray() if sp.issparse(rows) else rows
            out["target_genes"] = torch.from_numpy(np.asarray(rows, np.float32).reshape(n_sets, set_len, -1))
        if self.velocity is not None:
            out["basal_velocity"] = torch.from_numpy(self.velocity[basal_idx])
            out["basal_velocity_confidence"] = torch.from_numpy(self.confidence[basal_idx])
        return out

    def make_sets(self, group: Group | int, n_sets: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        gid = group if isinstance(group, (int, np.integer)) else group.gid
        target, basal = self.draw(int(gid), n_sets, rng)
        return self.collate(np.full(n_sets, gid), target, basal)


class GroupSampler(Sampler):
    """Per step: B group ids drawn proportionally to group size, and a seed for drawing their cells.

    Batch k depends only on (seed, k), and the stream starts at `start_step`: a run resumed at step k draws
    exactly the batches the unbroken run drew from step k on.
    """

    def __init__(self, sizes: np.ndarray, batch_size: int, n_batches: int, seed: int, start_step: int = 0):
        self.probs = sizes / sizes.sum()
        self.batch_size, self.n_batches = batch_size, n_batches
        self.seed, self.next_step = seed, start_step

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self):
        for _ in range(self.n_batches):
            rng = np.random.default_rng([self.seed, self.next_step])
            self.next_step += 1
            gids = rng.choice(len(self.probs), size=self.batch_size, p=self.probs)
            yield gids, int(rng.integers(2**62))


class RandomSets(Dataset):
    """Training batches from :class:`GroupSampler`'s (groups, seed) items.

    Under data-parallel training every process draws the whole global batch's rows (cheap) and gathers only its
    own contiguous share of the sets (``rank`` of ``world``): the processes see disjoint sets whose union is
    exactly the batch one process would train on with the global batch size.
    """

    def __init__(self, store: CellSetStore, n_batches: int, rank: int = 0, world: int = 1):
        self.store, self.n_batches, self.rank, self.world = store, n_batches, rank, world

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, item) -> dict[str, torch.Tensor]:
        gids, seed = item
        rng = np.random.default_rng(seed)
        drawn = [self.store.draw(int(g), 1, rng) for g in gids]
        share = len(gids) // self.world
        mine = slice(self.rank * share, (self.rank + 1) * share)
        gids, drawn = gids[mine], drawn[mine]
        return self.store.collate(gids, np.concatenate([t for t, _ in drawn]), np.concatenate([b for _, b in drawn]))


class FixedSets(Dataset):
    """Sets drawn once, per group from its own seeded generator: the same sets every validation pass."""

    def __init__(self, store: CellSetStore, gids: list[int], sets_per_group: int, batch_size: int, seed: int):
        drawn = [store.draw(g, sets_per_group, np.random.default_rng([seed, g])) for g in gids]
        self.store, self.batch_size = store, batch_size
        self.gids = np.repeat(np.asarray(gids, np.int64), sets_per_group)
        self.target = np.concatenate([t for t, _ in drawn]) if drawn else np.zeros((0, store.cell_set_len), np.int64)
        self.basal = np.concatenate([b for _, b in drawn]) if drawn else np.zeros((0, store.cell_set_len), np.int64)

    def __len__(self) -> int:
        return math.ceil(len(self.gids) / self.batch_size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.store.collate(self.gids[sl], self.target[sl], self.basal[sl])
