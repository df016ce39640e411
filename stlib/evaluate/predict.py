"""Predict the perturbed cells of a split and write them beside their real counterparts.

For every non-control group of the split (cell type × perturbation [× batch], split further by time point),
control cells of the same cell type (and time point where it has controls) are fed through the model in sets
of `cell_set_len`; as many cells are predicted as the real group has. Two files are written side by side,
in the layout cell-eval 0.8 reads: `<name>_pred.h5ad` (predicted perturbed cells + the real controls) and
`<name>_real.h5ad` (real perturbed cells + the same controls); see :mod:`stlib.evaluate.layout`. The pred file's
``obs["basal_index"]`` names the control cell (original row) each predicted cell was made from, so evaluation
measures the predicted shift from exactly those controls (:mod:`stlib.evaluate.metrics`).

X holds decoded genes (log1p, real gene names) when the model has a gene decoder, else the embedding.
How genes are read out (``gene_readout``):

* ``residual`` (default): each predicted cell's genes = its basal cell's real genes + decoder(predicted) −
  decoder(basal). The decoder's error in a cell type's *level* cancels (it is the same for both terms), only
  its decoding of the *change* remains: a decoder trained on a few cell types decodes a held-out type's level
  worse than the perturbation's size, and its change well (docs/decisions.md, 2026-11-22). Values are floored
  at 0, so the file is valid log-expression (cell-eval refuses negative values).

Which control cells: each (group, time point) draws its basal cells with its own generator, seeded by ``seed``
and the group's name, so every model with the same ``cell_set_len`` predicts from the same control cells, and
the baselines (:mod:`stlib.evaluate.baselines`) reuse them: all are scored from identical inputs.
* ``direct``: decoder(predicted), what ``model.predict_sets`` returns (State's behaviour).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from stlib.config import Config, config_from_dict, config_to_dict, parse_overrides
from stlib.constants import BASAL_INDEX_KEY, GROUP_KEY, SOURCE_INDEX_KEY
from stlib.constants import PREDICTION_UNS_KEY as UNS_KEY
from stlib.data.datamodule import Group, PerturbationDataModule, draw_rows
from stlib.data.io import write_h5ad
from stlib.errors import ConfigError, DataError
from stlib.evaluate.baselines import TRAIN_GROUPS_KEY, pooled_shifts, train_group_shifts
from stlib.evaluate.layout import rows
from stlib.loading import LoadedModel, load_any
from stlib.models.parameters import base_model

GENE_READOUTS = ("residual", "direct")


def _config_for(loaded: LoadedModel, data_overrides: Sequence[str]) -> Config:
    base = config_to_dict(loaded.config)
    base["data"].update({k: v for k, v in loaded.data_overrides.items() if v is not None})  # a State run's own
    for key, value in parse_overrides(data_overrides).items():
        if not key.startswith("data."):
            raise ConfigError(f"predict takes data.* overrides only, got {key!r}")
        base.setdefault("data", {})[key[5:]] = value
    return config_from_dict(base)


def _time_slices(group: Group, times: np.ndarray | None):
    """(time, target rows, basal rows) per time point of a group; basal from that time point when possible."""
    if times is None:
        yield group.time, group.obs_indices, group.basal_indices
        return
    for t in pd.unique(times[group.obs_indices]):
        target = group.obs_indices[times[group.obs_indices] == t]
        basal = group.basal_indices[times[group.basal_indices] == t]
        yield t, target, (basal if len(basal) else group.basal_indices)


@torch.no_grad()
def _predict_slice(
    model,
    store,
    gid: int,
    target: np.ndarray,
    basal_pool: np.ndarray,
    set_len: int,
    batch_size: int,
    rng: np.random.Generator,
    genes_out: bool,
    gene_readout: str = "residual",
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """As many predicted cells as `target` has, from sets of basal cells drawn from `basal_pool`: (embedding,
    genes or None, the basal row each predicted cell was made from)."""
    n_sets = math.ceil(len(target) / set_len)
    basal = draw_rows(basal_pool, n_sets, set_len, rng)
    tgt = draw_rows(target, n_sets, set_len, rng)  # only fills the batch dict; the model never sees targets
    emb, genes = [], []
    for start in range(0, n_sets, batch_size):
        sl = slice(start, start + batch_size)
        batch = store.collate(np.full(len(basal[sl]), gid), tgt[sl], basal[sl])
        out = _forward(model, batch)
        emb.append(out["pred"].reshape(-1, out["pred"].shape[-1]).float().cpu().numpy())
        if genes_out:
            decoded = out["genes"].reshape(-1, out["genes"].shape[-1]).float().cpu().numpy()
            if gene_readout == "residual":
                decoded = _residual_genes(model, store, batch["basal"], basal[sl].ravel(), decoded)
            genes.append(np.maximum(decoded, 0.0))  # log-expression is >= 0
    n = len(target)
    return np.concatenate(emb)[:n], (np.concatenate(genes)[:n] if genes_out else None), basal.ravel()[:n]


@torch.no_grad()
def _residual_genes(model, store, basal_emb: torch.Tensor, basal_rows: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """Real genes of the basal cells + decoder(predicted) − decoder(basal), [B*S, G]."""
    decoder = base_model(model).gene_decoder
    was_training = decoder.training
    decoder.eval()
    try:
        decoded_basal = decoder(basal_emb.reshape(-1, basal_emb.shape[-1])).float().cpu().numpy()
    finally:
        decoder.train(was_training)
    return rows(store.genes, basal_rows).astype(np.float32) + decoded - decoded_basal


def slice_rng(seed: int, name: str) -> np.random.Generator:
    """A generator for one (group, time point): the same draw whatever else is predicted, in whatever order."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" = the first GPU where there is one, else the CPU (as training's accelerator="auto")."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU here (use --device cpu or auto)")
    return resolved


def _forward(model, batch: dict) -> dict:
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    predict = getattr(model, "predict_sets", None)
    args = (batch["basal"], batch["pert"], batch["batch_index"], batch.get("time_index"))
    velocity = batch.get("basal_velocity")
    return predict(*args, velocity=velocity) if callable(predict) else model(*args, velocity=velocity)


def prediction_data(loaded: LoadedModel, cfg: Config, batch_size: int = 16, seed: int = 0,
                    cache: dict | None = None) -> PerturbationDataModule:
    """The data a model predicts from, read once per distinct data setting when several models share a `cache`."""
    key = (repr(cfg.data), cfg.model.cell_set_len, batch_size, seed, cfg.velocity.displacement,
           tuple(sorted(loaded.pert_map.items())))
    if cache is not None and key in cache:
        return cache[key]
    dm = PerturbationDataModule(cfg.data, cfg.model.cell_set_len, batch_size, pert_map=loaded.pert_map, seed=seed,
                                need_velocity=cfg.velocity.displacement)
    datamodule_log = logging.getLogger("stlib.data.datamodule")
    level = datamodule_log.level
    datamodule_log.setLevel(logging.ERROR)  # small-group warnings were the training's news, not prediction's
    try:
        dm.setup("predict")
    finally:
        datamodule_log.setLevel(level)
    if cache is not None:
        cache[key] = dm
    return dm


def predict_split(
    loaded: LoadedModel, cfg: Config, split: str = "val", batch_size: int = 16, seed: int = 0,
    gene_readout: str = "residual", device: str = "auto", data_cache: dict | None = None,
) -> tuple[ad.AnnData, ad.AnnData]:
    """(pred, real) AnnData for every non-control group of `split`, `batch_size` sets at a time on `device`."""
    loaded.model.to(resolve_device(device))
    if gene_readout not in GENE_READOUTS:
        raise ConfigError(f"gene_readout={gene_readout!r} is not one of {', '.join(GENE_READOUTS)}")
    d = cfg.data
    dm = prediction_data(loaded, cfg, batch_size, seed, data_cache)
    groups = [g for g in dm.groups(split) if g.pert != d.control_pert]
    if not groups:
        raise DataError(
            f"the {split!r} split has no perturbed groups to predict (check the TOML's "
            f"[zeroshot]/[fewshot] sections in {d.toml_config_path})"
        )
    model = loaded.model.eval()
    store = dm.store
    if getattr(base_model(model), "time_encoder", None) is not None and dm.time_values != loaded.dims.get("time_values"):
        raise DataError(f"the model's time encoder knows time points {loaded.dims.get('time_values')} but "
                         f"{d.time_col!r} here has {dm.time_values}")
    obs = dm.adata.obs
    times = obs[d.time_col].to_numpy() if d.time_col else None
    genes_out = loaded.dims.get("gene_dim") is not None and store.genes is not None
    emb, genes, target_rows, basal_rows, ids = [], [], [], [], []
    for g in groups:
        for t, target, basal_pool in _time_slices(g, times):
            name = f"{g.name}@{t}" if t is not None else g.name
            e, x, used = _predict_slice(
                model, store, g.gid, target, basal_pool, cfg.model.cell_set_len, batch_size, slice_rng(seed, name),
                genes_out, gene_readout,
            )
            emb.append(e)
            genes.append(x)
            target_rows.append(target)
            basal_rows.append(used)
            ids += [name] * len(target)

    # controls of every predicted cell type, the same real cells in both files
    ct_col = d.cell_type_key
    pert = obs[d.pert_col].astype(str).to_numpy()
    cell_types = {g.cell_type for g in groups}
    controls = np.flatnonzero((pert == d.control_pert) & obs[ct_col].astype(str).isin(cell_types).to_numpy())
    perturbed = np.concatenate(target_rows)
    all_rows = np.concatenate([controls, perturbed])
    group_id = np.array(["control"] * len(controls) + ids, dtype=object)

    real_emb = store.embed[all_rows]
    pred_emb = np.concatenate([store.embed[controls], *emb])
    if genes_out:
        real_x = rows(store.genes, all_rows)
        pred_x = np.concatenate([rows(store.genes, controls), *genes])
        var_names = list(dm.gene_names)
        space, shift_matrix = "gene", store.genes
    else:
        real_x, pred_x = real_emb.copy(), pred_emb.copy()
        var_names = [f"emb_{i}" for i in range(real_emb.shape[1])]
        space, shift_matrix = "embedding", store.embed

    keep = [c for c in (d.pert_col, ct_col, d.time_col, d.batch_col, "dataset") if c and c in obs]
    new_obs = obs.iloc[all_rows][keep].copy()
    new_obs[GROUP_KEY] = pd.Categorical(group_id.astype(str))
    new_obs[SOURCE_INDEX_KEY] = all_rows
    pred_obs = new_obs.copy()
    pred_obs[BASAL_INDEX_KEY] = np.concatenate([controls, *basal_rows])  # controls: themselves
    new_obs.index = [f"cell{i}" for i in range(len(all_rows))]
    settings = {
        "model": loaded.run_dir.name if loaded.run_dir else "model",
        "embed_key": d.embed_key,
        "pert_col": d.pert_col,
        "control_pert": d.control_pert,
        "cell_type_key": ct_col,
        "time_col": d.time_col or "",
        "batch_col": d.batch_col or "",
        "space": space,
        "gene_readout": gene_readout if genes_out else "",
        "split": split,
    }
    fits = train_group_shifts(dm, {"X": shift_matrix, "embedding": store.embed})
    settings |= {"setting": dm.split_config.setting, TRAIN_GROUPS_KEY: fits,
                 "train_mean_shift_X": pooled_shifts(fits, "X"),
                 "train_mean_shift_embedding": pooled_shifts(fits, "embedding")}
    var = pd.DataFrame(index=pd.Index(var_names, dtype=str))
    pred = ad.AnnData(X=pred_x.astype(np.float32), obs=pred_obs, var=var.copy())
    real = ad.AnnData(X=real_x.astype(np.float32), obs=new_obs.copy(), var=var.copy())
    pred.obsm[d.embed_key] = pred_emb.astype(np.float32)
    real.obsm[d.embed_key] = real_emb.astype(np.float32)
    pred.uns[UNS_KEY] = dict(settings)
    real.uns[UNS_KEY] = dict(settings)
    return pred, real


def predict_run(
    run_dir: str | Path,
    checkpoint: str | None = None,
    split: str = "val",
    out_dir: str | Path = "results/predictions",
    name: str | None = None,
    data_overrides: Sequence[str] = (),
    seed: int = 0,
    gene_readout: str = "residual",
    device: str = "auto",
    batch_size: int = 16,
    data_cache: dict | None = None,
) -> tuple[Path, Path]:
    """`stlib predict`: load a run (ours or State's), predict `split`, write <name>_pred/_real.h5ad.

    Several runs predicting from the same data share it through one `data_cache` dict (read once)."""
    loaded = load_any(run_dir, checkpoint)
    cfg = _config_for(loaded, data_overrides)
    pred, real = predict_split(loaded, cfg, split=split, seed=seed, gene_readout=gene_readout, device=device,
                               batch_size=batch_size, data_cache=data_cache)
    name = name or Path(run_dir).name
    pred.uns[UNS_KEY]["model"] = real.uns[UNS_KEY]["model"] = name
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred_path, real_path = out / f"{name}_pred.h5ad", out / f"{name}_real.h5ad"
    write_h5ad(pred, pred_path)
    write_h5ad(real, real_path)
    return pred_path, real_path
