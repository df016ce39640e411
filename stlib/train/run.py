"""One training run, from config to `final.ckpt`: pretraining, fine-tuning and the no-training baseline.

Everything that can fail on bad input (config, data keys, base checkpoint, perturbation maps) is checked in
:func:`prepare_run`, before a Trainer exists; the model itself is built by :mod:`stlib.finetune`. Re-running into
a run dir that has `checkpoints/last.ckpt` resumes from it; nothing already written is deleted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stlib.adapters.lora import save_adapter
from stlib.config import DEFAULT_CELL_SET_LEN, Config, save_config
from stlib.constants import (
    ADAPTER_FILE,
    BASE_FILE,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    DIMS_FILE,
    FINAL_CHECKPOINT,
    LAST_CHECKPOINT,
    RUN_SUMMARY_FILE,
    TENSORBOARD_DIR,
    TRAINABLE_PARAMS_FILE,
)
from stlib.data.datamodule import PerturbationDataModule, read_perturbation_names
from stlib.errors import ConfigError
from stlib.finetune import adapt_base, check_input, extend_pert_map, inherit_from_base, new_model
from stlib.loading import LoadedModel, load_any
from stlib.models.checkpoints import file_digest
from stlib.models.parameters import trainable_counts, trainable_summary

log = logging.getLogger("stlib")


@dataclass
class PreparedRun:
    cfg: Config
    datamodule: PerturbationDataModule
    model: nn.Module
    dims: dict
    base: LoadedModel | None
    summary: str


def prepare_run(cfg: Config) -> PreparedRun:
    """Resolve the base, load and validate the data, build the model with its adapters. No training."""
    cfg.data.check_required()
    base = load_any(cfg.model.init_from) if cfg.model.init_from else None
    pert_map = None
    if base is not None:
        cfg = inherit_from_base(cfg, base)
        if cfg.data.perturbation_features_file is None:
            pert_map, new_perts = extend_pert_map(base.pert_map, base.control_pert, read_perturbation_names(cfg.data),
                                                  cfg.data.control_pert)
            if new_perts:
                log.info("new perturbations (new encoder columns, initialised to the mean of the base's): %s",
                         new_perts)

    if cfg.model.cell_set_len is None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, cell_set_len=DEFAULT_CELL_SET_LEN))
    dm = PerturbationDataModule(cfg.data, cfg.model.cell_set_len, cfg.training.batch_size, pert_map=pert_map,
                                need_velocity=cfg.velocity.needs_velocity, seed=cfg.training.seed)
    dm.setup()  # the data's own keys are checked first: a missing obsm key is named as such
    if base is not None:
        check_input(cfg, base)
    dims = {"input_dim": dm.input_dim, "pert_dim": dm.pert_dim, "gene_dim": dm.gene_dim, "n_batches": dm.n_batches,
            "time_values": dm.time_values,
            "gene_names": list(dm.gene_names) if dm.gene_dim else None}
    if cfg.model.time_encoder and not dims["time_values"]:
        raise ConfigError("model.time_encoder=true needs time points: set data.time_col to an obs column with them "
                          "(e.g. day), or model.time_encoder=false")
    if base is None:
        model = new_model(cfg, dm, dims)
    else:
        model, cfg = adapt_base(base, dims, cfg, data=dm)
    return PreparedRun(cfg=cfg, datamodule=dm, model=model, dims=dims, base=base, summary=trainable_summary(model))


# ------------------------------------------------------------------------------------------ the run itself


def write_run_files(prep: PreparedRun, run_dir: Path, overrides: Sequence[str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(prep.cfg, run_dir / CONFIG_FILE, overrides)
    (run_dir / DIMS_FILE).write_text(json.dumps(prep.dims, indent=1))
    prep.datamodule.save_maps(run_dir)
    (run_dir / TRAINABLE_PARAMS_FILE).write_text(json.dumps(trainable_counts(prep.model), indent=1))
    if prep.base is not None:
        (run_dir / BASE_FILE).write_text(json.dumps(base_reference(prep.base), indent=1))


def base_reference(base: LoadedModel) -> dict:
    """Where a fine-tune's frozen weights come from: the base's run dir, checkpoint and content hash."""
    ckpt = base.checkpoint_path.resolve()
    return {"run_dir": str(base.run_dir.resolve()), "checkpoint": str(ckpt), "sha256": file_digest(ckpt),
            "bytes": ckpt.stat().st_size, "source": base.source}


def is_lean(cfg: Config) -> bool:
    """LoRA fine-tunes save what trains and name their base; a model trained in full saves every tensor."""
    return bool(cfg.model.init_from) and cfg.lora.enable


def use_tensor_cores() -> None:
    """float32 matmuls on CUDA run as TF32 (10-bit mantissa inputs, float32 accumulation): several times the
    throughput on Ampere and later for a precision that set-level losses do not notice. CUDA flags only: CPU
    results stay as they were."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def on_gpu(tcfg) -> bool:
    return tcfg.accelerator in ("gpu", "cuda") or (tcfg.accelerator == "auto" and torch.cuda.is_available())


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


class _NoAdvertising(logging.Filter):
    """Drops Lightning's "💡 Tip: try installing ..." lines: a run's log says what the run did, nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


def _quiet_third_party() -> None:
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoAdvertising) for f in logger.filters):
            logger.addFilter(_NoAdvertising())
    # lightning 2.6 calls a deprecated torch pytree helper at every fit; nothing a user can act on
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def train(cfg: Config, overrides: Sequence[str] = (), resume: str | Path | None = None,
          extra_callbacks: Sequence = ()) -> Path:
    """Train (or, with training.max_steps=0, just materialise) a model into {output_dir}/{name}/."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.utilities import rank_zero_only

    from stlib.train.callbacks import GracefulStop, LineProgress, WeightAverage
    from stlib.train.module import STLightningModule

    _quiet_third_party()
    tcfg = cfg.training
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    use_tensor_cores()
    L.seed_everything(tcfg.seed, verbose=False)
    started = time.time()
    prep = prepare_run(cfg)
    cfg = prep.cfg
    run_dir = cfg.run_dir
    main_process = rank_zero_only.rank == 0  # under data-parallel training, one process writes and talks
    say = print if main_process else (lambda *a, **k: None)
    if main_process:
        write_run_files(prep, run_dir, overrides)
    say(f"[stlib] run dir: {run_dir}", flush=True)
    say(f"[stlib] {prep.summary}", flush=True)

    ckpt_dir = run_dir / CHECKPOINT_DIR
    if tcfg.max_steps == 0:
        save_plain_checkpoint(prep.model, ckpt_dir / FINAL_CHECKPOINT)
        _write_summary(run_dir, "completed", 0, started)
        print(f"[stlib] max_steps=0: saved the untrained model to {ckpt_dir / FINAL_CHECKPOINT}", flush=True)
        return run_dir

    resume_path = Path(resume) if resume else (ckpt_dir / LAST_CHECKPOINT if (ckpt_dir / LAST_CHECKPOINT).exists() else None)
    start_step = 0
    if resume_path is not None:
        if not resume_path.is_file():
            raise ConfigError(f"--resume {resume_path}: no such checkpoint")
        start_step = int(torch.load(resume_path, map_location="cpu", weights_only=False, mmap=True).get("global_step", 0))
        say(f"[stlib] resuming from {resume_path} at step {start_step}", flush=True)
    prep.datamodule.start_step = start_step
    prep.datamodule.train_batches = tcfg.max_steps  # one epoch = the whole run: no epoch boundary to resume across
    prep.datamodule.pin_memory = on_gpu(tcfg)

    module = STLightningModule(prep.model, cfg, lean=is_lean(cfg))
    logger = TensorBoardLogger(save_dir=str(run_dir), name="", version=TENSORBOARD_DIR, default_hp_metric=False)
    logger.experiment.add_text("config", "```\n" + (run_dir / CONFIG_FILE).read_text() + "\n```", start_step)
    logger.experiment.add_text("trainable_params", prep.summary, start_step)
    # the newest `keep_checkpoints` step checkpoints stay (ranked by step), beside last.ckpt and final.ckpt
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="step_{step}", auto_insert_metric_name=False,
                                 every_n_train_steps=tcfg.steps(tcfg.ckpt_every_n_steps), save_last=True,
                                 save_top_k=tcfg.keep_checkpoints, monitor="step", mode="max")
    accelerator, devices = _resolve_devices(tcfg)
    stopper = GracefulStop(ckpt_dir / LAST_CHECKPOINT)
    callbacks = [checkpoint, LineProgress(), stopper, *extra_callbacks]
    if tcfg.average_weights_from is not None:
        callbacks.append(WeightAverage(int(tcfg.average_weights_from * tcfg.max_steps)))
    bar = tcfg.progress_bar and sys.stdout.isatty()  # a bar redrawn into a log file or notebook is noise
    if bar:
        callbacks.append(TQDMProgressBar(refresh_rate=tcfg.steps(tcfg.log_every_n_steps)))
    trainer = L.Trainer(
        max_steps=tcfg.max_steps, accelerator=accelerator, devices=devices, num_nodes=tcfg.num_nodes,
        strategy=tcfg.strategy,
        precision=tcfg.precision, logger=logger, callbacks=callbacks, default_root_dir=str(run_dir),
        val_check_interval=min(tcfg.steps(tcfg.val_every_n_steps), tcfg.max_steps), check_val_every_n_epoch=None,
        gradient_clip_val=tcfg.gradient_clip_val or None, log_every_n_steps=tcfg.steps(tcfg.log_every_n_steps),
        enable_progress_bar=bar, enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the data module gives each process its share of every batch itself
    )
    try:
        trainer.fit(module, datamodule=prep.datamodule, ckpt_path=str(resume_path) if resume_path else None)
    except BaseException:
        if main_process:
            _write_summary(run_dir, "failed", trainer.global_step, started)
        raise
    if stopper.requested is not None:
        if main_process:
            _write_summary(run_dir, "interrupted", trainer.global_step, started)
            print(f"[stlib] interrupted at step {trainer.global_step}: {ckpt_dir / LAST_CHECKPOINT} written; run the "
                  "same command again to resume", flush=True)
        raise SystemExit(130)  # the shell's code for an interrupted command
    # every process calls it, the main one writes; no optimizer state: a finished run resumes from last.ckpt
    trainer.save_checkpoint(ckpt_dir / FINAL_CHECKPOINT, weights_only=True)
    if not main_process:
        return run_dir
    if cfg.lora.enable:
        save_adapter(prep.model, ckpt_dir / ADAPTER_FILE)
    _write_summary(run_dir, "completed", trainer.global_step, started,
                   {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    print(f"[stlib] done: {trainer.global_step} steps in {time.time() - started:.1f}s -> {ckpt_dir / FINAL_CHECKPOINT}",
          flush=True)
    return run_dir


def _write_summary(run_dir: Path, status: str, steps: int, started: float, metrics: dict | None = None) -> None:
    summary = {"status": status, "steps": int(steps), "wall_time_s": round(time.time() - started, 2),
               "metrics": metrics or {}}
    (run_dir / RUN_SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
