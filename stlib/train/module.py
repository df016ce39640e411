"""The LightningModule: model + losses + optimizer + logging, composed (the model itself stays plain torch).

Losses per step: the distributional set loss between predicted and real perturbed sets (``loss.name``),
the gene-decoder loss when a decoder exists (a per-cell readout of the real cells' expression from their
embedding, which never reaches the prediction), and the RNA-velocity alignment loss when enabled, weighted by
a linear warm-up. Everything a comparison needs is logged to TensorBoard under one naming scheme:
``train/loss``, ``train/<component>``, ``val/loss``, ``train/grad_norm`` (before clipping), ``lr``,
``perf/cells_per_sec``, ``mhc/*``.
"""

from __future__ import annotations

import math
import random
import time

import lightning as L
import numpy as np
import torch
from torch import nn

from stlib.adapters.lora import trained_keys
from stlib.config import Config
from stlib.constants import LEAN_KEY
from stlib.errors import ModelLoadError, StlibError
from stlib.losses.distributional import set_loss, set_mean_loss
from stlib.losses.velocity import velocity_alignment_loss, velocity_weight
from stlib.models.parameters import base_model


class NonFiniteLossError(StlibError, RuntimeError):
    """Training produced NaN/inf: stop before the optimizer step so the last checkpoint stays good."""


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to `min_ratio` at `max_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(max_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _no_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases and 1-d gates are not decayed (decay would shrink them toward zero for no reason)."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name


class STLightningModule(L.LightningModule):
    def __init__(self, model: nn.Module, cfg: Config, lean: bool = False):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self._last_batch_time: float | None = None
        # lean: checkpoints hold what trains (adapters, modules trained in full), not the frozen base they name
        self.lean = lean
        self.strict_loading = not lean  # a lean checkpoint lacks the frozen base by design; checked on load
        self._trained = {f"model.{k}" for k in trained_keys(model)} if lean else None

    # ------------------------------------------------------------------ forward and losses
    def forward(self, batch: dict) -> dict:
        # decode=False: training reads the decoder out on real cells only (compute_losses); decoding the prediction
        # here would cost a decoder forward per step for nothing.
        return self.model(batch["basal"], batch["pert"], batch.get("batch_index"), batch.get("time_index"), decode=False,
                          velocity=batch.get("basal_velocity"))

    def compute_losses(self, batch: dict, out: dict, step: int) -> dict[str, torch.Tensor]:
        loss_cfg, velocity_cfg = self.cfg.loss, self.cfg.velocity
        per_set = set_loss(out["pred"], batch["target"], loss_cfg.name, loss_cfg.blur)
        losses = {loss_cfg.name: per_set.mean()}
        total = losses[loss_cfg.name]
        if loss_cfg.set_mean_weight > 0:
            # The energy distance pulls on a set's mean only weakly when its cells are spread widely (its gradient
            # for a translation d of the prediction scales ~ d / spread); this term trains the mean shift directly.
            losses["set_mean_loss"] = set_mean_loss(out["pred"], batch["target"]).mean()
            total = total + loss_cfg.set_mean_weight * losses["set_mean_loss"]
        decoder = getattr(base_model(self.model), "gene_decoder", None)
        if decoder is not None and "target_genes" in batch:
            # The decoder is a readout trained on real cells' (embedding, expression) pairs. Fed the prediction, its
            # loss would pull predicted cells toward whatever the decoder decodes well, not toward the real cells.
            genes = decoder(batch["target"])
            losses["gene_loss"] = nn.functional.mse_loss(genes, batch["target_genes"])
            total = total + self.cfg.decoder.loss_weight * losses["gene_loss"]
        if out.get("confidence") is not None:
            losses["confidence_loss"] = nn.functional.mse_loss(out["confidence"].float(), per_set.detach())
            total = total + 0.1 * losses["confidence_loss"]
        if velocity_cfg.alignment:
            weight = velocity_weight(step, velocity_cfg.loss_weight, self.cfg.training.steps(velocity_cfg.warmup_steps))
            losses["velocity_loss"] = velocity_alignment_loss(
                out["pred"], batch["basal"], batch["basal_velocity"], batch["basal_velocity_confidence"],
                beta=velocity_cfg.beta, skip_sets=batch.get("control_set"),
            )
            losses["velocity_weight"] = torch.tensor(weight)
            if weight > 0:
                total = total + weight * losses["velocity_loss"]
        losses["loss"] = total
        return losses

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self(batch)
        losses = self.compute_losses(batch, out, self.global_step)
        if self.checks_finite(self.global_step, losses["loss"].device) and not torch.isfinite(losses["loss"]):
            parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            raise NonFiniteLossError(
                f"non-finite loss at step {self.global_step} ({parts}); stopped before the optimizer step — the "
                f"last checkpoint in checkpoints/ is intact. Try a lower training.lr or mhc.enable=true."
            )
        bs = batch["basal"].shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=bs, prog_bar=name == "loss")
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        now = time.perf_counter()
        if self._last_batch_time is not None:
            cells = bs * batch["basal"].shape[1]
            self.log("perf/cells_per_sec", cells / max(now - self._last_batch_time, 1e-9), batch_size=bs)
        self._last_batch_time = now
        self._log_mhc_stats(bs)
        return losses["loss"]

    def checks_finite(self, step: int, device: torch.device) -> bool:
        """Whether this step's loss is checked for NaN/inf. The check reads the loss on the host, which on a GPU
        stalls the queue of launched kernels: there it runs every log interval and before every checkpoint (so
        no checkpoint is written from non-finite weights); on the CPU, where reading costs nothing, every step."""
        if device.type == "cpu":
            return True
        t = self.cfg.training
        return step % t.steps(t.log_every_n_steps) == 0 or (step + 1) % t.steps(t.ckpt_every_n_steps) == 0

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self(batch)
        losses = self.compute_losses(batch, out, self.global_step)
        bs = batch["basal"].shape[0]
        for name, value in losses.items():
            if name != "velocity_weight":
                self.log(f"val/{name}", value, batch_size=bs, prog_bar=name == "loss")

    def on_validation_start(self) -> None:
        self._last_batch_time = None  # validation time is not training throughput

    def on_validation_end(self) -> None:
        # Validation draws random numbers (creating its loader's iterator does); putting back the state the last
        # training step left keeps training's random stream independent of validation passes, which a run resumed
        # from a checkpoint taken just before one needs in order to match the unbroken run.
        state, self._rng_after_step = getattr(self, "_rng_after_step", None), None
        if state is not None:
            _set_rng_state(state)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self._rng_after_step = _rng_state()  # what a validation pass after this step must leave behind (~50 us)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip and log the norm *before* clipping (the stability signal we compare) in one pass over the grads.

        Lightning calls this every step, with or without a clip value; clip_grad_norm_ returns the total norm
        it measured, so logging costs no second pass.
        """
        grads = [p for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            norm = torch.nn.utils.clip_grad_norm_(grads, gradient_clip_val)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in grads])
            if gradient_clip_val:  # "value" clipping: Lightning's own
                self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.log("train/grad_norm", norm, batch_size=1)

    def _log_mhc_stats(self, bs: int) -> None:
        step = self.global_step
        if step % self.cfg.training.steps(self.cfg.training.log_every_n_steps):
            return
        hc = getattr(getattr(base_model(self.model), "transformer_backbone", None), "hyper_connections", None)
        if hc is None:
            return
        for name, value in hc.stability_stats().items():
            self.log(f"mhc/{name}", float(value), batch_size=bs)

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        tcfg = self.cfg.training
        decay, no_decay, gains = [], [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                if "velocity_displacement." in name:
                    gains.append(param)  # see velocity.gain_lr_scale
                else:
                    (no_decay if _no_decay(name, param) else decay).append(param)
        # torch's fused AdamW: one kernel over all parameters instead of a Python loop over tensors (CPU's
        # default); not under 16-mixed, where Lightning's grad scaler and our clipping need the plain step.
        fused = not str(self.cfg.training.precision).startswith("16") and all(
            p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in decay + no_decay + gains)
        groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if gains:
            groups.append({"params": gains, "weight_decay": 0.0, "lr": tcfg.lr * self.cfg.velocity.gain_lr_scale})
        optimizer = torch.optim.AdamW(groups, lr=tcfg.lr, fused=fused or None)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, tcfg.warmup_steps, max(tcfg.max_steps, 1), tcfg.min_lr_ratio),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """RNG state goes into the checkpoint so a resumed run draws the same dropout masks as an unbroken one.
        Stored as tensors and ints, so the checkpoint still loads with torch.load(weights_only=True)."""
        checkpoint["rng_state"] = _rng_state()
        if self.lean:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in self._trained}
            checkpoint[LEAN_KEY] = True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.lean:
            missing = sorted(self._trained - set(checkpoint["state_dict"]))
            if missing:
                raise ModelLoadError(f"the checkpoint lacks trained tensors of this model (saved with other LoRA or "
                                     f"mHC settings?): {missing[:5]}")
        # Applied at the first resumed batch, not now: creating DataLoader iterators draws from the torch RNG.
        self._pending_rng = checkpoint.get("rng_state")

    def on_train_batch_start(self, batch, batch_idx) -> None:
        state, self._pending_rng = getattr(self, "_pending_rng", None), None
        if state:
            _set_rng_state(state)


def _rng_state() -> dict:
    """torch, numpy and python RNG states, as tensors and plain values (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
