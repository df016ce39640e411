"""One training run, from config to `final.ckpt`: pretraining, fine-tuning and the no-training baseline.

Everything that can fail on bad input (config, data keys, base checkpoint, perturbation maps) is checked in
:func:`prepare_run`, before a Trainer exists. Re-running into a run dir that has `checkpoints/last.ckpt`
resumes from it; nothing already written is deleted.

Fine-tuning from a base (``model.init_from``): the architecture comes from the base. Perturbations are mapped
onto the base's one-hot columns: the experiment's control (e.g. Sham) shares the base's control column (e.g.
DMSO), every perturbation the base never saw (e.g. Burn) gets a new column initialised to the mean of the base's
columns (a "generic perturbation"), so the base's function is kept and only what is new must be learned.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stlib.adapters.lora import READOUT, apply_lora, count_parameters, has_readout, save_adapter, trainable_summary
from stlib.config import DECODER_FIELDS, Config, ConfigError, save_config
from stlib.data.datamodule import PerturbationDataModule
from stlib.models.loading import DIMS_FILE, LoadedModel, load_any

log = logging.getLogger("stlib")

# Architecture fields a fine-tune inherits from its base (the weights only fit that shape).
ARCHITECTURE_FIELDS = (
    "hidden_dim", "n_layers", "n_heads", "head_dim", "n_kv_heads", "intermediate_size", "n_encoder_layers",
    "n_decoder_layers", "activation", "rms_norm_eps", "predict_residual", "residual_space", "batch_encoder", "confidence_token",
    "decoder_hidden", "decoder_dropout", "attention_dropout", "embed_vocab_size", "output_relu",
    "final_down_then_up", "softplus", "decoder_skip",
)


@dataclass
class PreparedRun:
    cfg: Config
    datamodule: PerturbationDataModule
    model: nn.Module
    dims: dict
    base: LoadedModel | None
    summary: str


def extend_pert_map(base_map: dict[str, int], base_control: str | None, data_perts: Sequence[str],
                    data_control: str) -> tuple[dict[str, int], list[str]]:
    """Base map + the experiment's perturbations -> (map, names that got new columns)."""
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


def _inherit_architecture(cfg: Config, base_cfg, base_has_decoder: bool = True) -> Config:
    fields = [f for f in ARCHITECTURE_FIELDS if base_has_decoder or f not in DECODER_FIELDS]
    changed = {f: getattr(base_cfg, f) for f in fields if getattr(cfg.model, f) != getattr(base_cfg, f)}
    if changed:
        log.info("architecture taken from the base model: %s", changed)
    model_cfg = dataclasses.replace(cfg.model, **{f: getattr(base_cfg, f) for f in fields})
    return dataclasses.replace(cfg, model=model_cfg)


def _data_perturbations(cfg: Config) -> list[str]:
    """Perturbation names in the experiment, read cheaply (obs only) to build the map before setup."""
    from stlib.data.datamodule import read_perturbation_names

    return read_perturbation_names(cfg.data)


def prepare_run(cfg: Config) -> PreparedRun:
    """Resolve the base, load and validate the data, build the model with its adapters. No training."""
    base = None
    pert_map = None
    new_perts: list[str] = []
    if cfg.model.init_from:
        base = load_any(cfg.model.init_from)
        cfg = _inherit_architecture(cfg, base.model_cfg, base_has_decoder=bool(base.dims.get("gene_dim")))
        if cfg.data.perturbation_features_file is None:
            pert_map, new_perts = extend_pert_map(base.pert_map, base.control_pert, _data_perturbations(cfg),
                                                  cfg.data.control_pert)
        if base.model_cfg.velocity_displacement:  # a base that moves cells along velocity keeps doing so
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, velocity_displacement=True))

    dm = PerturbationDataModule(cfg.data, cfg.model.cell_set_len, cfg.training.batch_size, pert_map=pert_map,
                                need_velocity=cfg.model.use_velocity_alignment or cfg.model.velocity_displacement,
                                seed=cfg.training.seed)
    dm.setup()
    dims = {"input_dim": dm.input_dim, "pert_dim": dm.pert_dim, "gene_dim": dm.gene_dim, "n_batches": dm.n_batches,
            "time_values": dm.time_values,
            "gene_names": list(dm.gene_names) if dm.gene_dim else None}

    if cfg.model.time_encoder and not dims["time_values"]:
        raise ConfigError("model.time_encoder=true needs time points: set data.time_col to an obs column with them "
                          "(e.g. day), or model.time_encoder=false")
    if base is None:
        from stlib.models.state_transition import StateTransitionModel

        model = StateTransitionModel(cfg.model, input_dim=dm.input_dim, pert_dim=dm.pert_dim, gene_dim=dm.gene_dim,
                                     n_batches=dm.n_batches, n_times=len(dm.time_values or []))
    else:
        model = _model_from_base(base, dm, dims, new_perts, cfg.model)
        if getattr(model, "time_encoder", None) is not None:
            if (base.dims.get("time_values") or []) != (dims["time_values"] or []):
                raise ConfigError(f"the base model's time encoder knows time points {base.dims.get('time_values')} "
                                  f"but data.time_col gives {dims['time_values']}")
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, time_encoder=True))
        elif cfg.model.time_encoder:
            log.info("adding a time encoder (zero at start, trained in full) for time points %s", dims["time_values"])
            model.add_time_encoder(len(dims["time_values"] or []))
        if cfg.model.velocity_displacement and getattr(model, "velocity_displacement", None) is None:
            log.info("adding velocity displacement gains (zero at start, trained in full)")
            model.add_velocity_displacement()
        lora = cfg.model.lora
        if lora.enable and dims["gene_dim"] and not base.dims.get("gene_dim") and "gene_decoder" not in lora.modules_to_save:
            log.info("the new gene decoder trains in full beside the adapters (model.lora.modules_to_save)")
            lora = dataclasses.replace(lora, modules_to_save=[*lora.modules_to_save, "gene_decoder"])
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=lora))
    if model.gene_decoder is not None and (base is None or not base.dims.get("gene_dim")):
        _start_new_decoder(model.gene_decoder, dm, cfg.model)
    if cfg.model.use_mhc and getattr(model.transformer_backbone, "hyper_connections", None) is None:
        from stlib.adapters.mhc import apply_mhc

        model = apply_mhc(model, cfg.model.mhc)
    model = apply_lora(model, cfg.model.lora)
    summary = trainable_summary(model)
    return PreparedRun(cfg=cfg, datamodule=dm, model=model, dims=dims, base=base, summary=summary)


def _start_new_decoder(decoder: nn.Module, dm: PerturbationDataModule, model_cfg) -> None:
    """A new decoder starts as the least-squares readout of the training cells (decoder_skip), else at their mean."""
    if getattr(decoder, "skip", False):
        gram, cross, n = dm.train_normal_equations()
        decoder.fit_skip(torch.from_numpy(gram), torch.from_numpy(cross), n, model_cfg.decoder_skip_ridge)
        log.info("new gene decoder: linear readout fitted by ridge regression on %d training cells", n)
    else:
        decoder.start_at(torch.from_numpy(dm.train_gene_mean()))


def _model_from_base(base: LoadedModel, dm: PerturbationDataModule, dims: dict, new_perts: list[str],
                     model_cfg) -> nn.Module:
    from stlib.adapters.lora import merge_lora

    model = merge_lora(base.model)  # a fine-tuned base: fold its adapters in, start a fresh set
    model.train()
    if dims["input_dim"] != base.dims["input_dim"]:
        raise ConfigError(
            f"data.embed_key gives {dims['input_dim']}-d cells but the base model {base.run_dir} takes "
            f"{base.dims['input_dim']}-d input: use the embedding the base was trained on"
        )
    if model_cfg.dropout != model.cfg.dropout and not model.set_dropout(model_cfg.dropout):
        log.info("model.dropout=%s has no layer to act on: this base's encoders and project_out are single Linear "
                 "layers (n_encoder_layers / n_decoder_layers = 1)", model_cfg.dropout)
    if new_perts:
        log.info("new perturbations (new encoder columns, initialised to the mean of the base's): %s", new_perts)
        model.extend_perturbations(dm.pert_dim)
    elif dm.pert_dim != base.dims["pert_dim"]:
        raise ConfigError(f"perturbation encoding is {dm.pert_dim}-d but the base expects {base.dims['pert_dim']}")
    if dims["gene_dim"] and model.gene_decoder is None:
        log.info("the base model has no gene decoder: adding a new one for %d genes, trained in full", dims["gene_dim"])
        model.set_gene_decoder(dims["gene_dim"], model_cfg)
    elif dims["gene_dim"] and dims["gene_names"] != (base.gene_names or dims["gene_names"]):
        raise ConfigError("the data's genes differ from the base model's gene decoder genes (order and names must "
                          "match); set data.output_space=embedding to fine-tune without the decoder")
    elif not dims["gene_dim"] and model.gene_decoder is not None:
        log.info("data.output_space=%s: the base model's gene decoder is not used and not kept", "embedding")
        model.set_gene_decoder(None)
    if model.batch_encoder is not None and dm.n_batches != base.dims.get("n_batches"):
        raise ConfigError("the base model has a batch encoder for other batches; set data.batch_col=null or "
                          "pretrain with model.batch_encoder=false")
    return model


# ------------------------------------------------------------------------------------------ the run itself


def write_run_files(prep: PreparedRun, run_dir: Path, overrides: Sequence[str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(prep.cfg, run_dir / "config.yaml", overrides)
    (run_dir / DIMS_FILE).write_text(json.dumps(prep.dims, indent=1))
    prep.datamodule.save_maps(run_dir)
    trainable, total = count_parameters(prep.model)
    counts = {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1)}
    if has_readout(prep.model):  # the share that describes the adapters: the ST model without its gene readout
        t, n = count_parameters(prep.model, without=READOUT)
        counts.update(trainable_without_decoder=t, total_without_decoder=n, fraction_without_decoder=t / max(n, 1))
    (run_dir / "trainable_params.json").write_text(json.dumps(counts, indent=1))


def _resolve_devices(tcfg) -> tuple[str, object]:
    accelerator = tcfg.accelerator
    devices = tcfg.devices
    if devices == "auto":
        devices = 1  # one GPU where present, CPU otherwise; multi-GPU is asked for explicitly
    return accelerator, devices


def save_plain_checkpoint(model: nn.Module, path: Path, step: int = 0) -> None:
    """A Lightning-layout checkpoint written without a Trainer (the not-fine-tuned baseline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": step,
                "epoch": 0}, path)


def train(cfg: Config, overrides: Sequence[str] = (), resume: str | Path | None = None,
          extra_callbacks: Sequence = ()) -> Path:
    """Train (or, with training.max_steps=0, just materialise) a model into {output_dir}/{name}/."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger

    from stlib.train.callbacks import LineProgress, WeightAverage
    from stlib.train.module import STLightningModule

    tcfg = cfg.training
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    L.seed_everything(tcfg.seed, verbose=False)
    started = time.time()
    prep = prepare_run(cfg)
    cfg = prep.cfg
    run_dir = cfg.run_dir
    write_run_files(prep, run_dir, overrides)
    print(f"[stlib] run dir: {run_dir}", flush=True)
    print(f"[stlib] {prep.summary}", flush=True)

    ckpt_dir = run_dir / "checkpoints"
    if tcfg.max_steps == 0:
        save_plain_checkpoint(prep.model, ckpt_dir / "final.ckpt")
        _write_summary(run_dir, "completed", 0, started)
        print(f"[stlib] max_steps=0: saved the untrained model to {ckpt_dir / 'final.ckpt'}", flush=True)
        return run_dir

    resume_path = Path(resume) if resume else (ckpt_dir / "last.ckpt" if (ckpt_dir / "last.ckpt").exists() else None)
    start_step = 0
    if resume_path is not None:
        if not resume_path.is_file():
            raise ConfigError(f"--resume {resume_path}: no such checkpoint")
        start_step = int(torch.load(resume_path, map_location="cpu", weights_only=False).get("global_step", 0))
        print(f"[stlib] resuming from {resume_path} at step {start_step}", flush=True)
    prep.datamodule.start_step = start_step
    prep.datamodule.train_batches = tcfg.max_steps  # one epoch = the whole run: no epoch boundary to resume across

    module = STLightningModule(prep.model, cfg)
    logger = TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard", default_hp_metric=False)
    logger.experiment.add_text("config", "```\n" + (run_dir / "config.yaml").read_text() + "\n```", start_step)
    logger.experiment.add_text("trainable_params", prep.summary, start_step)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="step_{step}", auto_insert_metric_name=False,
                                 every_n_train_steps=tcfg.ckpt_every_n_steps, save_top_k=-1, save_last=True)
    accelerator, devices = _resolve_devices(tcfg)
    callbacks = [checkpoint, LineProgress(), *extra_callbacks]
    if tcfg.average_weights_from is not None:
        callbacks.append(WeightAverage(int(tcfg.average_weights_from * tcfg.max_steps)))
    if tcfg.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, tcfg.log_every_n_steps)))
    trainer = L.Trainer(
        max_steps=tcfg.max_steps, accelerator=accelerator, devices=devices, strategy=tcfg.strategy,
        precision=tcfg.precision, logger=logger, callbacks=callbacks, default_root_dir=str(run_dir),
        val_check_interval=min(tcfg.val_every_n_steps, tcfg.max_steps), check_val_every_n_epoch=None,
        gradient_clip_val=tcfg.gradient_clip_val or None, log_every_n_steps=tcfg.log_every_n_steps,
        enable_progress_bar=tcfg.progress_bar, enable_model_summary=False, num_sanity_val_steps=0,
    )
    try:
        trainer.fit(module, datamodule=prep.datamodule, ckpt_path=str(resume_path) if resume_path else None)
    except BaseException:
        _write_summary(run_dir, "failed", trainer.global_step, started)
        raise
    trainer.save_checkpoint(ckpt_dir / "final.ckpt")
    if cfg.model.lora.enable:
        save_adapter(prep.model, ckpt_dir / "adapter.pt")
    _write_summary(run_dir, "completed", trainer.global_step, started,
                   {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    print(f"[stlib] done: {trainer.global_step} steps in {time.time() - started:.1f}s -> {ckpt_dir / 'final.ckpt'}",
          flush=True)
    return run_dir


def _write_summary(run_dir: Path, status: str, steps: int, started: float, metrics: dict | None = None) -> None:
    summary = {"status": status, "steps": int(steps), "wall_time_s": round(time.time() - started, 2),
               "metrics": metrics or {}}
    (run_dir / "run_summary.json").write_text(json.dumps(summary, indent=1))
