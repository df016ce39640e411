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

import torch
from torch import nn

from stlib.config import Config, ModelConfig, load_config
from stlib.data.maps import BATCH_MAP_FILE, CELL_TYPE_MAP_FILE, PERT_MAP_FILE, load_map

DIMS_FILE = "model_dims.json"
CHECKPOINT_ORDER = ("final.ckpt", "last.ckpt")


class ModelLoadError(ValueError):
    """The path does not hold a model we can load; the message says what was expected."""


@dataclass
class LoadedModel:
    """A model with everything needed to feed it: its maps, dims and the data settings it was trained with."""

    model: nn.Module
    model_cfg: ModelConfig
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
    config: Config | None = None


def find_checkpoint(run_dir: Path, checkpoint: str | None = None) -> Path:
    ckpt_dir = run_dir / "checkpoints"
    if checkpoint:
        path = Path(checkpoint)
        candidates = [path, ckpt_dir / path, run_dir / path]
        for c in candidates:
            if c.is_file():
                return c
        raise ModelLoadError(f"checkpoint {checkpoint!r} not found in {ckpt_dir}")
    for name in CHECKPOINT_ORDER:
        if (ckpt_dir / name).is_file():
            return ckpt_dir / name
    ckpts = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        raise ModelLoadError(f"no checkpoint in {ckpt_dir} (expected final.ckpt or last.ckpt)")
    return ckpts[-1]


def _split_path(path: str | Path, checkpoint: str | None) -> tuple[Path, str | None]:
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model path not found: {path}")
    if path.is_file():
        if path.suffix != ".ckpt":
            raise ModelLoadError(f"{path} is neither a run dir nor a .ckpt file")
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return run_dir, str(path)
    return path, checkpoint


def is_stlib_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / DIMS_FILE).is_file()


def build_model(model_cfg: ModelConfig, dims: dict) -> nn.Module:
    """The plain ST model, then mHC and LoRA as the config says (same order as training)."""
    from stlib.adapters.lora import apply_lora
    from stlib.adapters.mhc import apply_mhc
    from stlib.models.state_transition import StateTransitionModel

    model = StateTransitionModel(
        model_cfg, input_dim=dims["input_dim"], pert_dim=dims["pert_dim"],
        gene_dim=dims.get("gene_dim"), n_batches=dims.get("n_batches"),
        n_times=len(dims["time_values"]) if dims.get("time_values") else None,
    )
    if model_cfg.use_mhc:
        model = apply_mhc(model, model_cfg.mhc)
    return apply_lora(model, model_cfg.lora)


def load_lightning_state_dict(ckpt_path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt)
    prefix = "model."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_stlib_run(run_dir: Path, checkpoint: str | None = None) -> LoadedModel:
    cfg = load_config(run_dir / "config.yaml")
    dims = json.loads((run_dir / DIMS_FILE).read_text())
    ckpt_path = find_checkpoint(run_dir, checkpoint)
    state = load_lightning_state_dict(ckpt_path)
    if cfg.model.decoder_skip and dims.get("gene_dim") and not any("skip_weight" in k for k in state):
        # a run from before model.decoder_skip existed (its config.yaml lacks the key): an MLP-only decoder
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, decoder_skip=False))
    model = build_model(cfg.model, dims)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"{ckpt_path} does not match the model described by {run_dir / 'config.yaml'}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.eval()
    maps = {name: load_map(run_dir / f) if (run_dir / f).is_file() else {}
            for name, f in (("pert", PERT_MAP_FILE), ("cell_type", CELL_TYPE_MAP_FILE), ("batch", BATCH_MAP_FILE))}
    d = cfg.data
    return LoadedModel(
        model=model, model_cfg=cfg.model, pert_map=maps["pert"], control_pert=d.control_pert, dims=dims,
        data_overrides={"embed_key": d.embed_key, "pert_col": d.pert_col, "control_pert": d.control_pert,
                        "cell_type_key": d.cell_type_key, "batch_col": d.batch_col, "output_space": d.output_space},
        cell_type_map=maps["cell_type"], batch_map=maps["batch"], gene_names=dims.get("gene_names"),
        run_dir=run_dir, checkpoint_path=ckpt_path, source="stlib", config=cfg,
    )


def load_any(path: str | Path, checkpoint: str | None = None) -> LoadedModel:
    """stlib run dir, State run dir, or a .ckpt in either -> LoadedModel (model in eval mode)."""
    from stlib.models.state_checkpoint import is_state_run_dir, load_state_run

    run_dir, checkpoint = _split_path(path, checkpoint)
    if is_stlib_run_dir(run_dir):
        return load_stlib_run(run_dir, checkpoint)
    if is_state_run_dir(run_dir):
        run = load_state_run(run_dir, checkpoint)
        return LoadedModel(
            model=run.model, model_cfg=run.model_cfg, pert_map=run.pert_map,
            control_pert=run.data_overrides.get("control_pert"),
            dims={"input_dim": run.model.input_dim, "pert_dim": run.model.pert_dim, "gene_dim": run.model.gene_dim,
                  "n_batches": run.var_dims.get("batch_dim")},  # the loaded model's own sizes, not var_dims' guesses
            data_overrides=run.data_overrides, cell_type_map=run.cell_type_map, batch_map=run.batch_map,
            gene_names=run.gene_names, run_dir=run_dir, checkpoint_path=run.checkpoint_path, source="state",
        )
    raise ModelLoadError(
        f"{run_dir} is not a run dir: expected config.yaml + {DIMS_FILE} + checkpoints/ (stlib) or config.yaml + "
        f"var_dims.pkl + pert_onehot_map.pt + checkpoints/ (State `state tx train`)"
    )


def load_model(path: str | Path, checkpoint: str | None = None) -> nn.Module:
    """The public entry point for notebooks: a ready model in eval mode with `predict_sets`."""
    return load_any(path, checkpoint).model
