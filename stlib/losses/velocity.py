"""Velocity alignment: pull each predicted shift toward the cell's RNA velocity, in the model's space.

Why: RNA velocity says where a cell's state is heading; if a perturbation pushes cells along their own
trajectory, the predicted shift (pred - basal) should point the same way. The loss is a cosine distance,
so only directions matter (scvelo's embedded velocity has an arbitrary scale):

    L = sum_i w_i (1 - cos(pred_i - basal_i, v_i)) / sum_i w_i,    w_i = confidence_i ** beta

in [0, 2]. Cells whose velocity is zero (no estimate) or whose weight is zero contribute nothing, nor do
control -> control sets (their target is their own control, so the ideal shift is ~0); if no
cell is left, L = 0 with a zero gradient. The weight on the total loss ramps up linearly
(``velocity_weight``) so the main distributional loss shapes the model first.

Shape letters: B sets, S cells per set, D model space dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def velocity_alignment_loss(
    pred: torch.Tensor,
    basal: torch.Tensor,
    velocity: torch.Tensor,
    confidence: torch.Tensor,
    beta: float = 1.0,
    eps: float = 1e-8,
    skip_sets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Confidence-weighted mean cosine distance between pred - basal [B, S, D] and velocity [B, S, D].

    skip_sets [B] bool: sets left out (control -> control sets: their ideal shift is ~0, and the cosine's
    gradient there grows like 1 / |shift|)."""
    if not (pred.shape == basal.shape == velocity.shape):
        raise ValueError(
            f"pred, basal and velocity must have the same shape [B, S, D]; got {tuple(pred.shape)}, "
            f"{tuple(basal.shape)}, {tuple(velocity.shape)}"
        )
    if confidence.shape != pred.shape[:-1]:
        raise ValueError(f"confidence must have shape {tuple(pred.shape[:-1])} ([B, S]), got {tuple(confidence.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    shift = pred - basal
    velocity = velocity.to(shift.dtype)
    cos = F.cosine_similarity(shift, velocity, dim=-1, eps=eps)  # [B, S]; 0 where shift is zero
    weight = confidence.to(shift.dtype).clamp_min(0.0) ** beta  # 0 ** 0 = 1: beta = 0 weights every cell
    has_velocity = velocity.norm(dim=-1) > eps
    weight = torch.where(has_velocity, weight, torch.zeros_like(weight))
    if skip_sets is not None:
        if skip_sets.shape != pred.shape[:1]:
            raise ValueError(f"skip_sets must have shape [{pred.shape[0]}] ([B]), got {tuple(skip_sets.shape)}")
        weight = weight * (~skip_sets.to(torch.bool, copy=False)).to(weight.dtype)[:, None]
    return (weight * (1.0 - cos)).sum() / weight.sum().clamp_min(eps)


def velocity_weight(step: int, lam: float = 0.1, warmup_steps: int = 1000) -> float:
    """lam * min(1, step / warmup_steps): 0 at step 0, lam after warm-up; warmup_steps <= 0 gives lam at once."""
    if warmup_steps <= 0:
        return float(lam)
    return float(lam) * min(1.0, max(step, 0) / warmup_steps)
