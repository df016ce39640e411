"""Per-set distances between a predicted and a real set of perturbed cells.

A model sees *sets* of control cells and the matching real perturbed cells are a different sample of
the same population, so the loss compares distributions, not pairs: the energy distance (State's
default) or a debiased Sinkhorn divergence, both from geomloss (Feydy et al., AISTATS 2019), which
accepts batched [B, S, D] input and returns one value per set. ``mse`` is the paired alternative for
matched cells. ``blur`` only affects Sinkhorn (energy has no length scale).

Shapes: B sets, S cells per set, D features (embedding dims or genes).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from geomloss import SamplesLoss


def _mse(pred: torch.Tensor, target: torch.Tensor, blur: float) -> torch.Tensor:
    return (pred - target).pow(2).mean(dim=(1, 2))


@cache
def _samples_loss(kind: str, blur: float) -> SamplesLoss:
    return SamplesLoss(loss=kind, p=2, blur=blur)


def _geomloss(kind: str) -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
    def loss(pred: torch.Tensor, target: torch.Tensor, blur: float) -> torch.Tensor:
        # geomloss' reductions are delicate in half precision: compute in float32, cast back.
        return _samples_loss(kind, float(blur))(pred.float(), target.float()).to(pred.dtype)

    loss.__name__ = f"_{kind}"
    return loss


SET_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "energy": _geomloss("energy"),
    "sinkhorn": _geomloss("sinkhorn"),
    "mse": _mse,
}


def _check_sets(caller: str, pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.dim() != 3 or target.dim() != 3 or pred.shape[0] != target.shape[0] or pred.shape[2] != target.shape[2]:
        raise ValueError(f"{caller} expects pred and target [B, S, D] with the same B and D; "
                         f"got {tuple(pred.shape)} and {tuple(target.shape)}")


def set_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, blur: float = 0.05) -> torch.Tensor:
    """pred, target [B, S, D] -> per-set loss [B]. kind: energy | sinkhorn | mse."""
    try:
        fn = SET_LOSSES[kind]
    except KeyError:
        raise ValueError(f"unknown set loss {kind!r}; expected one of {', '.join(SET_LOSSES)}") from None
    _check_sets("set_loss", pred, target)
    if kind == "mse" and pred.shape != target.shape:
        raise ValueError(f"mse compares matched cells: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return fn(pred, target, blur)


def set_mean_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred, target [B, S, D] -> per-set mean over D of (mean over cells of pred - of target)^2, [B].

    The squared error of the set's mean, i.e. of the predicted mean shift from the same controls: what the
    evaluation's gene correlation and direction cosine read. Sets may differ in size (S_pred != S_target).
    """
    _check_sets("set_mean_loss", pred, target)
    return (pred.mean(dim=1) - target.mean(dim=1)).pow(2).mean(dim=-1)
