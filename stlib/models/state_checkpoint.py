"""Read a `state tx train` run dir (or a .ckpt inside one) into a ready StateTransitionModel.

Users start from State runs (ST-Tahoe, their own): ``config.yaml``, ``checkpoints/*.ckpt`` (Lightning:
``state_dict`` + ``hyper_parameters``), ``pert_onehot_map.pt``, ``cell_type_onehot_map.torch``,
``batch_onehot_map.torch``, ``var_dims.pkl``. Everything is read without executing code from the files:
checkpoints with ``weights_only=True``, maps through :func:`stlib.data.maps.load_map` (numpy scalar types
allow-listed), ``var_dims.pkl`` with an Unpickler that only rebuilds builtins and numpy arrays/scalars.

State's options are translated into our :class:`Config` groups (model, decoder, loss); options that change the architecture in a
way we do not implement raise :class:`StateCheckpointError` naming the option. Loading is strict: every
tensor must find its parameter and vice versa.
"""

from __future__ import annotations

import dataclasses
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from stlib.config import LOSSES, Config, DecoderConfig, LossConfig, ModelConfig, config_from_dict
from stlib.constants import BATCH_MAP_FILE, CELL_TYPE_MAP_FILE, CHECKPOINT_DIR, CONFIG_FILE, PERT_MAP_FILE
from stlib.data.maps import load_map
from stlib.errors import ConfigError, ModelLoadError
from stlib.models.checkpoints import find_checkpoint, read_checkpoint, split_model_path
from stlib.models.state_transition import StateTransitionModel

VAR_DIMS_FILE = "var_dims.pkl"
EMBED_KEY = "transformer_backbone.embed_tokens.weight"
DATA_OVERRIDE_KEYS = ("embed_key", "pert_col", "control_pert", "cell_type_key", "batch_col", "output_space")

# State's `transformer_backbone_kwargs` (HF LlamaConfig names) -> our ModelConfig fields.
BACKBONE_KEYS = {
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "head_dim": "head_dim",
    "intermediate_size": "intermediate_size",
    "rms_norm_eps": "rms_norm_eps",
    "attention_dropout": "attention_dropout",
    "vocab_size": "embed_vocab_size",
}
# State's model kwargs copied as they are (same meaning, maybe another name): "group.field" for other groups.
MODEL_KEYS = {
    "hidden_dim": "hidden_dim",
    "cell_set_len": "cell_set_len",
    "n_encoder_layers": "n_encoder_layers",
    "n_decoder_layers": "n_decoder_layers",
    "activation": "activation",
    "dropout": "dropout",
    "predict_residual": "predict_residual",
    "batch_encoder": "batch_encoder",
    "confidence_token": "confidence_token",
    "blur": "loss.blur",
    "decoder_weight": "decoder.loss_weight",
}
# State's own defaults where they differ from ours: a State config without the key built this.
STATE_DEFAULTS = {"n_encoder_layers": 2, "n_decoder_layers": 2, "dropout": 0.1}
# Options whose non-default value changes the network in a way we do not implement: {key: the value we support}.
UNSUPPORTED = {
    "transformer_backbone_key": "llama",
    "use_batch_token": False,
    "batch_predictor": False,
    "mask_attn": False,
    "transformer_decoder": False,
    "finetune_vci_decoder": False,
    "residual_decoder": False,
    "use_effect_gating_token": False,
    "use_basal_projection": True,
    "predict_mean": False,
}
# LlamaConfig choices our backbone hard-codes: {key: the value we implement}.
BACKBONE_FIXED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "bidirectional_attention": True}


class StateCheckpointError(ModelLoadError):
    """A State run we cannot load as it is; the message names the file/option and what was expected."""


@dataclass
class StateRun:
    model: StateTransitionModel  # eval mode, strictly loaded
    config: Config  # the model, decoder and loss groups State's options translate to
    data_overrides: dict  # DataConfig fields from State's data.kwargs
    pert_map: dict[str, int]
    cell_type_map: dict[str, int]
    batch_map: dict[str, int]
    var_dims: dict
    gene_names: list[str] | None
    checkpoint_path: Path


# --------------------------------------------------------------------------------------------- files

class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds builtins containers/scalars and numpy arrays/scalars; anything else is refused."""

    ALLOWED = {
        ("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "str", "int", "float", "bool",
                                  "complex", "bytes", "bytearray", "slice", "range")
    } | {
        (m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("scalar", "_reconstruct")
    } | {("numpy", "dtype"), ("numpy", "ndarray")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only builtins and numpy arrays are allowed)")


def read_var_dims(path: str | Path) -> dict:
    """var_dims.pkl -> dict, names as plain str."""
    with open(path, "rb") as fh:
        try:
            raw = _RestrictedUnpickler(fh).load()
        except pickle.UnpicklingError as exc:
            raise StateCheckpointError(f"{path}: {exc}") from None
    if not isinstance(raw, dict):
        raise StateCheckpointError(f"{path} holds {type(raw).__name__}, expected a dict of dimensions")
    out = dict(raw)
    for key in ("gene_names", "pert_names"):
        if out.get(key) is not None:
            out[key] = [str(x) for x in out[key]]
    return out


def is_state_run_dir(path: str | Path) -> bool:
    """A `state tx train` output dir: config.yaml, var_dims.pkl, pert_onehot_map.pt and checkpoints/."""
    p = Path(path)
    return all((p / f).is_file() for f in (CONFIG_FILE, VAR_DIMS_FILE, PERT_MAP_FILE)) and (p / CHECKPOINT_DIR).is_dir()


# --------------------------------------------------------------------------------------------- config

def _state_model_kwargs(config: dict, hparams: dict) -> dict:
    """State's model kwargs: config.yaml `model.kwargs`, falling back on the checkpoint's hyper_parameters."""
    kwargs = dict(hparams)
    kwargs.update((config.get("model") or {}).get("kwargs") or {})
    return kwargs


def _check_supported(kw: dict, backbone: dict) -> None:
    for key, ok in UNSUPPORTED.items():
        if key in kw and kw[key] != ok and not (ok is False and kw[key] is None):
            raise StateCheckpointError(f"State option model.kwargs.{key}={kw[key]!r} is not supported "
                                       f"(stlib implements {key}={ok!r})")
    for key, ok in BACKBONE_FIXED.items():
        if key in backbone and backbone[key] != ok:
            raise StateCheckpointError(f"State option model.kwargs.transformer_backbone_kwargs.{key}="
                                       f"{backbone[key]!r} is not supported (stlib implements {ok!r})")
    if (kw.get("lora") or {}).get("enable"):
        raise StateCheckpointError("State option model.kwargs.lora.enable=true is not supported: merge the adapters "
                                   "into the backbone (peft merge_and_unload) and save a plain checkpoint first")


def model_config_from_state(kw: dict, gene_decoder: dict | None, embed_key: str | None) -> Config:
    """Translate State's model kwargs (+ its decoder_cfg) into our model, decoder and loss groups."""
    kw = {**STATE_DEFAULTS, **kw}
    backbone = dict(kw.get("transformer_backbone_kwargs") or {})
    _check_supported(kw, backbone)
    groups: dict[str, dict[str, Any]] = {"model": {}, "decoder": {}, "loss": {}}
    for theirs, ours in MODEL_KEYS.items():
        if kw.get(theirs) is not None:
            group, _, name = ours.rpartition(".")
            groups[group or "model"][name] = kw[theirs]
    model = groups["model"]
    model.update({ours: backbone[theirs] for theirs, ours in BACKBONE_KEYS.items() if backbone.get(theirs) is not None})
    size = backbone.get("hidden_size")
    if size is not None and size != model.setdefault("hidden_dim", size):
        raise StateCheckpointError(f"State run has hidden_dim={model['hidden_dim']} but transformer_backbone_kwargs"
                                   f".hidden_size={size}; stlib needs them equal")
    loss = kw.get("loss", "energy")
    if loss in LOSSES:
        groups["loss"]["name"] = loss
    else:
        warnings.warn(f"State loss {loss!r} has no stlib equivalent ({', '.join(LOSSES)}); using 'energy' for "
                      "fine-tuning (the model itself is unaffected)", stacklevel=3)
    decoder = groups["decoder"]
    if gene_decoder is not None:
        decoder["hidden"] = list(gene_decoder.get("hidden_dims", DecoderConfig().hidden))
        if gene_decoder.get("dropout") is not None:
            decoder["dropout"] = gene_decoder["dropout"]
    decoder["softplus"] = False  # State's decoder ends in ReLU whatever its `softplus` key says
    decoder["skip"] = False  # State's decoder is an MLP alone (its weights fix the layout)
    # State clamps predictions at 0 when it has no gene decoder, or when it works in HVG space
    model["output_relu"] = gene_decoder is None or embed_key in (None, "X_hvg")
    model["residual_space"] = "hidden"  # State adds the shift to the encoded cell, before project_out
    try:
        return Config(model=ModelConfig(**model), decoder=DecoderConfig(**decoder), loss=LossConfig(**groups["loss"]))
    except (ConfigError, TypeError) as exc:
        raise StateCheckpointError(f"State model options do not make a valid stlib model: {exc}") from None


def _decoder_cfg_from_weights(state: dict[str, torch.Tensor]) -> dict:
    """decoder_cfg read off `gene_decoder.decoder.{0,4,8,...}.weight` (Linear every 4 modules, last one 2 apart)."""
    linears = sorted(
        (int(k.split(".")[2]), v.shape) for k, v in state.items()
        if k.startswith("gene_decoder.decoder.") and k.endswith(".weight") and v.dim() == 2
    )
    return {"latent_dim": linears[0][1][1], "gene_dim": linears[-1][1][0],
            "hidden_dims": [shape[0] for _, shape in linears[:-1]]}


def _stlib_config(config: dict) -> Config:
    """An stlib-style config.yaml beside State's files (our groups, or the flat `model.*` keys of old runs)."""
    try:
        return config_from_dict({k: v for k, v in config.items() if k not in ("data", "training")})
    except ConfigError as exc:
        raise StateCheckpointError(f"config.yaml: {exc}") from None


# --------------------------------------------------------------------------------------------- loading

def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}


def load_state_dict_strictly(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """load_state_dict(strict=True), but a mismatch names every missing/unexpected key and shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys (in the model, not in the checkpoint): {missing}")
        if unexpected:
            parts.append(f"unexpected keys (in the checkpoint, not in the model): {unexpected}")
        if shapes:
            parts.append(f"shape mismatches: {shapes}")
        raise StateCheckpointError(f"{source} does not match the model its config describes; " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def load_state_run(path: str | Path, checkpoint: str | None = None) -> StateRun:
    """State run dir (or a .ckpt inside one) -> StateRun with the model strictly loaded, in eval mode."""
    try:
        run_dir, checkpoint = split_model_path(path, checkpoint)
        ckpt_path = find_checkpoint(run_dir, checkpoint)
        ckpt = read_checkpoint(ckpt_path)
    except ModelLoadError as exc:
        raise StateCheckpointError(str(exc)) from None
    state: dict[str, torch.Tensor] = ckpt["state_dict"]
    hparams = dict(ckpt.get("hyper_parameters") or {})
    config = _read_yaml(run_dir / CONFIG_FILE)
    var_dims = read_var_dims(run_dir / VAR_DIMS_FILE) if (run_dir / VAR_DIMS_FILE).is_file() else {}

    data_kwargs = dict((config.get("data") or {}).get("kwargs") or config.get("data") or {})
    for key in ("embed_key", "output_space", "control_pert"):
        if key not in data_kwargs and key in hparams:
            data_kwargs[key] = hparams[key]
    data_overrides = {k: data_kwargs[k] for k in DATA_OVERRIDE_KEYS if k in data_kwargs}

    def dim(name: str) -> int | None:
        value = hparams.get(name, var_dims.get(name))
        return None if value is None else int(value)

    input_dim, output_dim, pert_dim = dim("input_dim"), dim("output_dim"), dim("pert_dim")
    if input_dim is None or pert_dim is None:
        raise StateCheckpointError(f"{run_dir}: input_dim/pert_dim not found in the checkpoint's hyper_parameters "
                                   f"or {VAR_DIMS_FILE}")
    if output_dim is not None and output_dim != input_dim:
        raise StateCheckpointError(f"State run maps {input_dim}-d input to {output_dim}-d output; stlib predicts in "
                                   "the input space (input_dim == output_dim)")

    model_section = config.get("model") or {}
    is_state_config = "kwargs" in model_section or not model_section
    gene_decoder = hparams.get("decoder_cfg") if hparams.get("gene_decoder_bool", True) is not False else None
    if gene_decoder is None and "gene_decoder.decoder.0.weight" in state:
        gene_decoder = _decoder_cfg_from_weights(state)  # older State runs rebuild the decoder without a cfg
    if is_state_config:
        kw = _state_model_kwargs(config, hparams)
        cfg = model_config_from_state(kw, gene_decoder, data_overrides.get("embed_key"))
        if data_overrides.get("output_space") == "all":
            cfg.model = dataclasses.replace(cfg.model, final_down_then_up=True)
        if EMBED_KEY in state:  # the unused token embedding: its size is whatever State's config had
            cfg.model = dataclasses.replace(cfg.model, embed_vocab_size=int(state[EMBED_KEY].shape[0]))
    else:
        cfg = _stlib_config(config)
    gene_dim = None
    if gene_decoder is not None:
        if gene_decoder.get("latent_dim", input_dim) != input_dim:
            raise StateCheckpointError(f"State decoder_cfg.latent_dim={gene_decoder['latent_dim']} differs from the "
                                       f"model's output_dim={input_dim}")
        gene_dim = int(gene_decoder["gene_dim"])
    n_batches = dim("batch_dim") if cfg.model.batch_encoder else None

    try:
        model = StateTransitionModel(cfg.model, input_dim=input_dim, pert_dim=pert_dim, gene_dim=gene_dim,
                                     n_batches=n_batches, decoder=cfg.decoder)
    except ValueError as exc:
        raise StateCheckpointError(f"{run_dir}: {exc}") from None
    load_state_dict_strictly(model, state, ckpt_path)
    model.eval()

    maps = {}
    for name, fname in (("pert", PERT_MAP_FILE), ("cell_type", CELL_TYPE_MAP_FILE), ("batch", BATCH_MAP_FILE)):
        maps[name] = load_map(run_dir / fname) if (run_dir / fname).is_file() else {}
    gene_names = var_dims.get("gene_names") or hparams.get("gene_names")
    return StateRun(
        model=model, config=cfg, data_overrides=data_overrides, pert_map=maps["pert"],
        cell_type_map=maps["cell_type"], batch_map=maps["batch"], var_dims=var_dims,
        gene_names=[str(g) for g in gene_names] if gene_names is not None else None, checkpoint_path=ckpt_path,
    )


# --------------------------------------------------------------------------------------------- writing

# the inverse of BACKBONE_KEYS / MODEL_KEYS for the fields a State config spells
_TO_BACKBONE = {ours: theirs for theirs, ours in BACKBONE_KEYS.items()}
_TO_MODEL = {ours: theirs for theirs, ours in MODEL_KEYS.items() if "." not in ours}


def write_state_run(run_dir: str | Path, model: StateTransitionModel, cfg: Config, data: dict,
                    pert_names: list[str], gene_names: list[str] | None = None,
                    decoder_hidden: list[int] | None = None) -> Path:
    """Write `model` as a `state tx train` run dir that :func:`load_state_run` (and State) read back.

    For benchmarks and tests at State's shapes without State installed (our own writer of its layout:
    config.yaml with data/model kwargs, checkpoints/final.ckpt with state_dict + hyper_parameters, var_dims.pkl,
    pert_onehot_map.pt). ``data``: State's data kwargs (embed_key, output_space, pert_col, control_pert, ...).
    Only models State builds are written: residual in hidden space, the output clamp State's rule gives.
    """
    m, embed_key = cfg.model, data.get("embed_key")
    has_decoder = model.gene_decoder is not None
    if m.residual_space != "hidden":
        raise ConfigError("write_state_run: State adds the shift in hidden space (model.residual_space=hidden)")
    if m.output_relu != (not has_decoder or embed_key in (None, "X_hvg")):
        raise ConfigError(f"write_state_run: State clamps outputs exactly when it has no gene decoder or reads X_hvg; "
                          f"model.output_relu={m.output_relu} with embed_key={embed_key!r} is not what State builds")
    run_dir = Path(run_dir)
    (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    backbone = {theirs: getattr(m, ours) for ours, theirs in _TO_BACKBONE.items() if getattr(m, ours) is not None}
    backbone |= {"hidden_size": m.hidden_dim, **BACKBONE_FIXED, "use_cache": False}
    kwargs = {theirs: getattr(m, ours) for ours, theirs in _TO_MODEL.items() if getattr(m, ours) is not None}
    kwargs |= {"blur": cfg.loss.blur, "loss": cfg.loss.name, "transformer_backbone_key": "llama",
               "transformer_backbone_kwargs": backbone}
    config = {"data": {"name": "PerturbationDataModule", "kwargs": dict(data)}, "model": {"name": "state",
                                                                                         "kwargs": kwargs}}
    OmegaConf.save(OmegaConf.create(config), run_dir / CONFIG_FILE)
    dims = {"input_dim": model.input_dim, "output_dim": model.input_dim, "pert_dim": len(pert_names),
            "pert_names": list(pert_names), "gene_dim": model.gene_dim, "hvg_dim": model.gene_dim,
            "gene_names": list(gene_names) if gene_names is not None else None}
    hparams = {**dims, "hidden_dim": m.hidden_dim, "cell_set_len": m.cell_set_len, "embed_key": embed_key,
               "output_space": data.get("output_space"), "control_pert": data.get("control_pert"),
               "gene_decoder_bool": has_decoder}
    if has_decoder:
        hparams["decoder_cfg"] = {"latent_dim": model.input_dim, "gene_dim": model.gene_dim,
                                  "hidden_dims": list(decoder_hidden or cfg.decoder.hidden),
                                  "dropout": cfg.decoder.dropout, "residual_decoder": False}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams, "global_step": 0, "epoch": 0},
               run_dir / CHECKPOINT_DIR / "final.ckpt")
    with open(run_dir / VAR_DIMS_FILE, "wb") as fh:
        pickle.dump(dims, fh)
    from stlib.data.maps import save_map

    save_map({name: i for i, name in enumerate(pert_names)}, run_dir / PERT_MAP_FILE)
    return run_dir
