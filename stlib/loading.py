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

from stlib.adapters.lora import merge_lora, trained_keys
from stlib.config import Config, config_from_dict, config_to_dict, load_config
from stlib.constants import (
    BASE_FILE,
    BATCH_MAP_FILE,
    CELL_TYPE_MAP_FILE,
    CONFIG_FILE,
    DIMS_FILE,
    LEAN_KEY,
    PERT_MAP_FILE,
    STANDALONE_KEY,
)
from stlib.data.maps import load_map
from stlib.errors import ModelLoadError
from stlib.finetune import adapt_base, build_model
from stlib.models.checkpoints import (
    file_digest,
    find_checkpoint,
    lightning_state_dict,
    read_checkpoint,
    split_model_path,
)

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
    ckpt = read_checkpoint(ckpt_path)
    state = lightning_state_dict(ckpt)
    if cfg.decoder.skip and dims.get("gene_dim") and not any("skip_weight" in k for k in state):
        # a run from before decoder.skip existed (its config.yaml lacks the key): an MLP-only decoder
        cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, skip=False))
    if ckpt.get(LEAN_KEY):  # only what trained: rebuild the fine-tune on its base, then put the trained tensors on
        model, _ = adapt_base(load_base(run_dir), dims, cfg)
        frozen = set(model.state_dict()) - trained_keys(model)
    else:
        model, frozen = build_model(cfg, dims), set()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) - frozen or unexpected:
        raise ModelLoadError(
            f"{ckpt_path} does not match the model described by {run_dir / CONFIG_FILE}: "
            f"missing {sorted(set(missing) - frozen)[:5]}, unexpected {unexpected[:5]}"
        )
    model.eval()
    maps = _maps(run_dir)
    return LoadedModel(
        model=model, config=cfg, pert_map=maps["pert"], control_pert=cfg.data.control_pert, dims=dims,
        data_overrides={k: getattr(cfg.data, k) for k in DATA_KEYS}, cell_type_map=maps["cell_type"],
        batch_map=maps["batch"], gene_names=dims.get("gene_names"), run_dir=run_dir, checkpoint_path=ckpt_path,
    )


def load_base(run_dir: Path) -> LoadedModel:
    """The base a lean fine-tune names in base.json, checked to be the very file it was trained from."""
    path = run_dir / BASE_FILE
    if not path.is_file():
        raise ModelLoadError(f"{run_dir} holds a lean checkpoint (only what trained) but no {BASE_FILE} naming its base")
    ref = json.loads(path.read_text())
    ckpt = Path(ref["checkpoint"])
    if not ckpt.is_file():
        raise ModelLoadError(f"the base of {run_dir} moved: {ckpt} is gone. Put it back, or point {path}'s "
                             f"'checkpoint' and 'run_dir' at its new place (the content hash is checked)")
    if file_digest(ckpt) != ref["sha256"]:
        raise ModelLoadError(f"the base of {run_dir} changed: {ckpt} no longer has the content it was fine-tuned "
                             f"from (sha256 {ref['sha256'][:12]}…); the fine-tune's adapters only fit that base")
    return load_any(ref["run_dir"], str(ckpt))


def export_merged(path: str | Path, out: str | Path) -> Path:
    """A standalone checkpoint of a trained model: LoRA folded into the weights, every tensor included, with the
    config, sizes and maps to rebuild it — for sharing a fine-tune without its base (`stlib export --merged`)."""
    loaded = load_any(path)
    model = merge_lora(loaded.model)
    cfg = dataclasses.replace(loaded.config, lora=dataclasses.replace(loaded.config.lora, enable=False),
                              model=dataclasses.replace(loaded.config.model, init_from=None))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                STANDALONE_KEY: {"config": config_to_dict(cfg), "dims": loaded.dims, "pert_map": loaded.pert_map,
                                 "cell_type_map": loaded.cell_type_map, "batch_map": loaded.batch_map}}, out)
    return out


def _load_standalone(path: Path, ckpt: dict) -> LoadedModel:
    saved = ckpt[STANDALONE_KEY]
    cfg, dims = config_from_dict(saved["config"]), saved["dims"]
    model = build_model(cfg, dims)
    model.load_state_dict(lightning_state_dict(ckpt), strict=True)
    model.eval()
    return LoadedModel(model=model, config=cfg, pert_map=saved["pert_map"], control_pert=cfg.data.control_pert,
                       dims=dims, data_overrides={k: getattr(cfg.data, k) for k in DATA_KEYS},
                       cell_type_map=saved["cell_type_map"], batch_map=saved["batch_map"],
                       gene_names=dims.get("gene_names"), run_dir=path.parent, checkpoint_path=path)


def load_any(path: str | Path, checkpoint: str | None = None) -> LoadedModel:
    """stlib run dir, State run dir, a .ckpt in either, or an exported standalone .ckpt -> LoadedModel (eval mode)."""
    from stlib.models.state_checkpoint import is_state_run_dir, load_state_run

    if Path(path).is_file() and Path(path).suffix == ".ckpt":
        ckpt = read_checkpoint(Path(path))
        if STANDALONE_KEY in ckpt:
            return _load_standalone(Path(path), ckpt)
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
