"""LoRA adapters through peft, for fine-tuning a pretrained ST model on a new experiment.

The pretrained base is frozen; low-rank adapters on the attention projections train, plus the modules a
new experiment needs in full (``LoraConfig.modules_to_save``: the perturbation encoder that learns the new
perturbations, the output heads) and any mHC coefficients. peft does the adapter work
(``get_peft_model``, ``merge_and_unload``); this module decides what is trainable and how adapters are
saved, so that a small adapter file can be put back onto a fresh copy of the base.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from stlib.config import LoraConfig
from stlib.errors import ConfigError, ModelLoadError

MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
# Always trained in full when present: new coefficients that the base never had.
ALWAYS_TRAINABLE = ("hyper_connections", "time_encoder", "velocity_displacement")


def lora_target_modules(cfg: LoraConfig) -> list[str]:
    targets = list(cfg.target_modules)
    if cfg.adapt_mlp:
        targets += [m for m in MLP_MODULES if m not in targets]
    return targets


def _present(model: nn.Module, names: list[str]) -> list[str]:
    """modules_to_save entries that exist in this model (a model without gene decoder has none to save)."""
    children = dict(model.named_children())
    return [n for n in names if children.get(n) is not None]


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap `model` with peft LoRA; returns the peft model (or `model` itself when LoRA is off)."""
    if not cfg.enable:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora_target_modules(cfg)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ConfigError(f"lora.target_modules: {missing} not found in the model (it has e.g. q_proj, k_proj, "
                         f"v_proj, o_proj, gate_proj, up_proj, down_proj)")
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=_present(model, list(cfg.modules_to_save)) or None,
        bias="none",
    )
    peft_model = get_peft_model(model, peft_cfg)
    for name, param in peft_model.named_parameters():
        if any(f".{key}." in f".{name}" for key in ALWAYS_TRAINABLE):
            param.requires_grad_(True)
    return peft_model


def trained_keys(model: nn.Module) -> set[str]:
    """State-dict keys of what training changes: trainable tensors (adapters, modules_to_save, mHC), and the
    buffers of modules that train (e.g. a new gene decoder's fitted linear readout). The rest is the frozen base."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}

    def trains(module: str) -> bool:
        return any(t.startswith(module + ".") for t in trainable)

    saved = set(model.state_dict())  # non-persistent buffers are never saved
    return trainable | {name for name, _ in model.named_buffers() if name in saved and trains(name.rsplit(".", 1)[0])}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changed (:func:`trained_keys`), detached on the CPU."""
    keep = trained_keys(model)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in keep}


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(adapter_state_dict(model), path)
    return path


def load_adapter(model: nn.Module, path_or_state: str | Path | dict) -> nn.Module:
    """Put a saved adapter onto a model built the same way (same base, mHC and LoRA settings)."""
    state = path_or_state if isinstance(path_or_state, dict) else torch.load(path_or_state, weights_only=True)
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ModelLoadError(f"adapter has tensors this model lacks (was it built with other LoRA/mHC settings?): "
                         f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    model.load_state_dict(state, strict=False)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights: a plain ST model for export (State-style keys)."""
    merge = getattr(model, "merge_and_unload", None)
    return merge() if callable(merge) else model
