"""Building the model a run trains: from scratch, or adapted from a pretrained base — in one place.

A fine-tune (``model.init_from``) takes, in this order: the base's architecture → its perturbation encoder
grown by one column per perturbation it never saw (initialised to the mean of its columns, a "generic
perturbation", so the base's function is kept) → a gene decoder added or dropped for the data's output space
→ a time encoder and velocity gains where asked → mHC → LoRA. :func:`adapt_base` returns the model and the
config resolved to match it; nothing rewrites either afterwards.

Shapes: P perturbation columns, G genes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from stlib.adapters.lora import apply_lora, merge_lora
from stlib.adapters.mhc import apply_mhc
from stlib.config import ARCHITECTURE_FIELDS, DECODER_FIELDS, DEFAULT_CELL_SET_LEN, Config
from stlib.errors import ConfigError
from stlib.linear import normal_equations
from stlib.models.state_transition import StateTransitionModel

if TYPE_CHECKING:
    from stlib.data.datamodule import PerturbationDataModule
    from stlib.loading import LoadedModel

log = logging.getLogger("stlib")


def add_adapters(model: nn.Module, cfg: Config) -> nn.Module:
    """mHC, then LoRA, as the config says: the same order for training and for loading a saved run."""
    if cfg.mhc.enable and getattr(model.transformer_backbone, "hyper_connections", None) is None:
        model = apply_mhc(model, cfg.mhc)
    return apply_lora(model, cfg.lora)


def _plain_model(cfg: Config, dims: dict) -> StateTransitionModel:
    return StateTransitionModel(
        cfg.model, input_dim=dims["input_dim"], pert_dim=dims["pert_dim"], gene_dim=dims.get("gene_dim"),
        n_batches=dims.get("n_batches"), n_times=len(dims["time_values"]) if dims.get("time_values") else None,
        decoder=cfg.decoder, velocity_displacement=cfg.velocity.displacement,
    )


def build_model(cfg: Config, dims: dict) -> nn.Module:
    """The model a config and the data's sizes describe (weights fresh), with its adapters: a saved run's shape."""
    return add_adapters(_plain_model(cfg, dims), cfg)


def new_model(cfg: Config, data: PerturbationDataModule, dims: dict) -> nn.Module:
    """A model trained from scratch; a gene decoder starts as the training cells' linear readout."""
    model = _plain_model(cfg, dims)
    if model.gene_decoder is not None:
        start_new_decoder(model.gene_decoder, data, cfg)
    return add_adapters(model, cfg)


def start_new_decoder(decoder: nn.Module, data: PerturbationDataModule, cfg: Config) -> None:
    """A new decoder starts as the ridge readout of the training cells (decoder.skip), else at their mean."""
    if getattr(decoder, "skip", False):
        gram, cross, n = normal_equations(data.train_cell_chunks())
        decoder.fit_skip(gram, cross, n, cfg.decoder.skip_ridge)
        log.info("new gene decoder: linear readout fitted by ridge regression on %d training cells", n)
    else:
        total, n = None, 0
        for _, genes in data.train_cell_chunks():
            part = torch.as_tensor(genes, dtype=torch.float64).sum(0)
            total, n = (part if total is None else total + part), n + len(genes)
        decoder.start_at(total / n)


def extend_pert_map(base_map: dict[str, int], base_control: str | None, data_perts: Sequence[str],
                    data_control: str) -> tuple[dict[str, int], list[str]]:
    """Base map + the experiment's perturbations -> (map, names that got new columns).

    The experiment's control shares the base's control column; every other unseen name gets a new column.
    """
    mapping = dict(base_map)
    if data_control not in mapping:
        if base_control is None or base_control not in base_map:
            raise ConfigError(
                f"cannot place control {data_control!r}: the base model's control perturbation is unknown; set "
                f"data.control_pert to one of the base's perturbations or fine-tune from a run dir with maps"
            )
        mapping[data_control] = base_map[base_control]
    new = [p for p in sorted(set(data_perts)) if p not in mapping]
    next_index = max(base_map.values(), default=-1) + 1
    for offset, name in enumerate(new):
        mapping[name] = next_index + offset
    return mapping, new


def check_input(cfg: Config, base: LoadedModel) -> bool:
    """Whether the fine-tune reads the input its base was trained on; another one stops here with both named,
    unless model.allow_other_input says the user means it."""
    base_key = base.data_overrides.get("embed_key")
    if not base_key or base_key == cfg.data.embed_key:
        return True
    what = "HVG log-expression" if base_key == "X_hvg" else "embedding" if base_key != "X" else "expression (X)"
    relu = ", clamped at 0 (output_relu)" if base.config.model.output_relu else ""
    if not cfg.model.allow_other_input:
        raise ConfigError(
            f"the base {base.run_dir} read obsm['{base_key}'] ({base.dims['input_dim']}-d {what}{relu}); data.embed_key "
            f"is '{cfg.data.embed_key}'. Fine-tune on the input the base was trained on, or set "
            f"model.allow_other_input=true if you mean it (the base's weights then meet another space)")
    log.warning("fine-tuning on obsm['%s'] though the base read obsm['%s'] (model.allow_other_input=true); the "
                "output clamp comes from this config (model.output_relu=%s), not the base", cfg.data.embed_key,
                base_key, cfg.model.output_relu)
    return False


def inherit_from_base(cfg: Config, base: LoadedModel) -> Config:
    """The fine-tune's config with the base's architecture (and decoder shape, when the base has a decoder)."""
    base_cfg = base.config
    base_key = base.data_overrides.get("embed_key")
    same_input = not base_key or base_key == cfg.data.embed_key  # another input is refused in check_input
    fields = [f for f in ARCHITECTURE_FIELDS if same_input or f != "output_relu"]
    changed = {f: getattr(base_cfg.model, f) for f in fields if getattr(cfg.model, f) != getattr(base_cfg.model, f)}
    if cfg.model.cell_set_len is None:
        changed["cell_set_len"] = base_cfg.model.cell_set_len or DEFAULT_CELL_SET_LEN
    model_cfg = dataclasses.replace(cfg.model, **{f: getattr(base_cfg.model, f) for f in fields},
                                    cell_set_len=cfg.model.cell_set_len or base_cfg.model.cell_set_len
                                    or DEFAULT_CELL_SET_LEN)
    decoder_cfg = cfg.decoder
    if base.dims.get("gene_dim"):
        changed.update({f"decoder.{f}": getattr(base_cfg.decoder, f) for f in DECODER_FIELDS
                        if getattr(cfg.decoder, f) != getattr(base_cfg.decoder, f)})
        decoder_cfg = dataclasses.replace(cfg.decoder, **{f: getattr(base_cfg.decoder, f) for f in DECODER_FIELDS})
    if changed:
        log.info("architecture taken from the base model: %s", changed)
    velocity_cfg = cfg.velocity
    if base_cfg.velocity.displacement and not velocity_cfg.displacement:
        velocity_cfg = dataclasses.replace(velocity_cfg, displacement=True)  # a base that moves cells keeps doing so
    return dataclasses.replace(cfg, model=model_cfg, decoder=decoder_cfg, velocity=velocity_cfg)


def adapt_base(base: LoadedModel, dims: dict, cfg: Config, data: PerturbationDataModule | None = None
               ) -> tuple[nn.Module, Config]:
    """Base model + the experiment's sizes -> (the model to fine-tune, the config that describes it).

    `cfg` has gone through :func:`inherit_from_base` (the data module was built from it). With `data`, a new gene
    decoder starts as the training cells' readout; without it (rebuilding a saved lean run, whose checkpoint
    brings every trained tensor) nothing is fitted and the steps are logged quietly.
    """
    say = log.info if data is not None else log.debug
    model = merge_lora(base.model)  # a fine-tuned base: fold its adapters in, start a fresh set
    model.train()
    if dims["input_dim"] != base.dims["input_dim"]:
        raise ConfigError(
            f"data.embed_key gives {dims['input_dim']}-d cells but the base model {base.run_dir} takes "
            f"{base.dims['input_dim']}-d input: use the embedding the base was trained on"
        )
    if cfg.model.dropout != base.config.model.dropout and not model.set_dropout(cfg.model.dropout):
        say("model.dropout=%s has no layer to act on: this base's encoders and project_out are single Linear "
                 "layers (n_encoder_layers / n_decoder_layers = 1)", cfg.model.dropout)

    if dims["pert_dim"] > base.dims["pert_dim"] and cfg.data.perturbation_features_file is None:
        model.extend_perturbations(dims["pert_dim"])
    elif dims["pert_dim"] != base.dims["pert_dim"]:
        raise ConfigError(f"perturbation encoding is {dims['pert_dim']}-d but the base expects {base.dims['pert_dim']}")

    new_decoder = False
    if dims["gene_dim"] and model.gene_decoder is None:
        say("the base model has no gene decoder: adding a new one for %d genes, trained in full", dims["gene_dim"])
        model.set_gene_decoder(dims["gene_dim"], cfg.decoder)
        if data is not None:
            start_new_decoder(model.gene_decoder, data, cfg)
        new_decoder = True
    elif dims["gene_dim"] and model.gene_dim != dims["gene_dim"]:
        # State's var_dims names every gene of its data, but with output_space=gene its decoder predicts hvg_dim of
        # them (the genes of obsm['X_hvg']): the names can match while the widths do not
        layer = f"layers['{cfg.data.gene_layer}']" if cfg.data.gene_layer else "X"
        raise ConfigError(
            f"the base {base.run_dir}'s gene decoder predicts {model.gene_dim} genes but the data's gene matrix "
            f"(data.gene_layer: {layer}) has {dims['gene_dim']}: give it the genes the decoder was trained on (a State "
            f"base with output_space=gene decodes the {model.gene_dim} genes of its obsm['X_hvg']), or set "
            "data.output_space=embedding to fine-tune without the decoder")
    elif dims["gene_dim"] and dims["gene_names"] != (base.gene_names or dims["gene_names"]):
        raise ConfigError("the data's genes differ from the base model's gene decoder genes (order and names must "
                          "match); set data.output_space=embedding to fine-tune without the decoder")
    elif not dims["gene_dim"] and model.gene_decoder is not None:
        say("data.output_space=embedding: the base model's gene decoder is not used and not kept")
        model.set_gene_decoder(None)
    if model.batch_encoder is not None and dims["n_batches"] != base.dims.get("n_batches"):
        raise ConfigError("the base model has a batch encoder for other batches; set data.batch_col=null or "
                          "pretrain with model.batch_encoder=false")

    if model.time_encoder is not None:
        if (base.dims.get("time_values") or []) != (dims["time_values"] or []):
            raise ConfigError(f"the base model's time encoder knows time points {base.dims.get('time_values')} "
                              f"but data.time_col gives {dims['time_values']}")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, time_encoder=True))
    elif cfg.model.time_encoder:
        say("adding a time encoder (zero at start, trained in full) for time points %s", dims["time_values"])
        model.add_time_encoder(len(dims["time_values"] or []))
    if cfg.velocity.displacement and model.velocity_displacement is None:
        say("adding velocity displacement gains (zero at start, trained in full)")
        model.add_velocity_displacement()

    if new_decoder and cfg.lora.enable and "gene_decoder" not in cfg.lora.modules_to_save:
        say("the new gene decoder trains in full beside the adapters (lora.modules_to_save)")
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(
            cfg.lora, modules_to_save=[*cfg.lora.modules_to_save, "gene_decoder"]))
    return add_adapters(model, cfg), cfg
