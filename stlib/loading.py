"""Load any model a user points us at: an stlib run dir, a State run dir, or a `.ckpt` inside either.

stlib run dirs hold `config.yaml` (our resolved Config), `model_dims.json` and `checkpoints/*.ckpt`; the
model is rebuilt from them (mHC and LoRA applied as configured) and loaded strictly. State run dirs are
read by :mod:`stlib.models.state_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from stlib.config import Config, load_config
from stlib.constants import BATCH_MAP_FILE, CELL_TYPE_MAP_FILE, CONFIG_FILE, DIMS_FILE, PERT_MAP_FILE
from stlib.data.maps import load_map
from stlib.errors import ModelLoadError
from stlib.finetune import build_model
from stlib.models.checkpoints import find_checkpoint, load_lightning_state_dict, split_model_path

DATA_KEYS = ("embed_key", "pert_col", "control_pert", "cell_type_key", "batch_col", "output_space")


@dataclass
class LoadedModel:
    """A model with everything needed to feed it: its maps, dims and the data settings it was trained with."""

    model: nn.Module
    config: Config  # the run's resolved config (for a State run: the groups its options translate to)
    pert_map: dict[str, int]
    control_pert: str | None
    dims: dict
    data_overrides: dict = field(default_factory=dict)  # DataConfig fields from the run (embed_key, pert_col, ...)
    cell_type_map: dict[str, int] = field(default_factory=dict)
    batch_map: dict[str, int] = field(default_factory=dict)
    gene_names: list[str] | None = None
    run_dir: Path | None = None
    checkpoint_path: Path | None = None
    source: str = "stlib"  # "stlib" | "state"


def is_stlib_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / DIMS_FILE).is_file()


def _maps(run_dir: Path) -> dict[str, dict]:
    return {name: load_map(run_dir / f) if (run_dir / f).is_file() else {}
            for name, f in (("pert", PERT_MAP_FILE), ("cell_type", CELL_TYPE_MAP_FILE), ("batch", BATCH_MAP_FILE))}


def load_stlib_run(run_dir: Path, checkpoint: str | None = None) -> LoadedModel:
    cfg = load_config(run_dir / CONFIG_FILE)
    dims = json.loads((run_dir / DIMS_FILE).read_text())
    ckpt_path = find_checkpoint(run_dir, checkpoint)
    state = load_lightning_state_dict(ckpt_path)
    if cfg.decoder.skip and dims.get("gene_dim") and not any("skip_weight" in k for k in state):
        # a run from before decoder.skip existed (its config.yaml lacks the key): an MLP-only decoder
        cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, skip=False))
    model = build_model(cfg, dims)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"{ckpt_path} does not match the model described by {run_dir / CONFIG_FILE}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.eval()
    maps = _maps(run_dir)
    return LoadedModel(
        model=model, config=cfg, pert_map=maps["pert"], control_pert=cfg.data.control_pert, dims=dims,
        data_overrides={k: getattr(cfg.data, k) for k in DATA_KEYS}, cell_type_map=maps["cell_type"],
        batch_map=maps["batch"], gene_names=dims.get("gene_names"), run_dir=run_dir, checkpoint_path=ckpt_path,
    )


def load_any(path: str | Path, checkpoint: str | None = None) -> LoadedModel:
    """stlib run dir, State run dir, or a .ckpt in either -> LoadedModel (model in eval mode)."""
    from stlib.models.state_checkpoint import is_state_run_dir, load_state_run

    run_dir, checkpoint = split_model_path(path, checkpoint)
    if is_stlib_run_dir(run_dir):
        return load_stlib_run(run_dir, checkpoint)
    if is_state_run_dir(run_dir):
        run = load_state_run(run_dir, checkpoint)
        return LoadedModel(
            model=run.model, config=run.config, pert_map=run.pert_map,
            control_pert=run.data_overrides.get("control_pert"),
            dims={"input_dim": run.model.input_dim, "pert_dim": run.model.pert_dim, "gene_dim": run.model.gene_dim,
                  "n_batches": run.var_dims.get("batch_dim")},  # the loaded model's own sizes, not var_dims' guesses
            data_overrides=run.data_overrides, cell_type_map=run.cell_type_map, batch_map=run.batch_map,
            gene_names=run.gene_names, run_dir=run_dir, checkpoint_path=run.checkpoint_path, source="state",
        )
    raise ModelLoadError(
        f"{run_dir} is not a run dir: expected {CONFIG_FILE} + {DIMS_FILE} + checkpoints/ (stlib) or {CONFIG_FILE} + "
        f"var_dims.pkl + pert_onehot_map.pt + checkpoints/ (State `state tx train`)"
    )


def load_model(path: str | Path, checkpoint: str | None = None) -> nn.Module:
    """The public entry point for notebooks: a ready model in eval mode with `predict_sets`."""
    return load_any(path, checkpoint).model
