"""Counting and unwrapping: what any model here (plain, mHC, peft-wrapped) reports about its parameters."""

from __future__ import annotations

from torch import nn

READOUT = "gene_decoder"  # a per-cell readout beside the ST model; its size says nothing about the adapters


def base_model(model: nn.Module) -> nn.Module:
    """The underlying ST model, whether or not an adapter library wraps it (peft's `get_base_model`)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def count_parameters(model: nn.Module, without: str | None = None) -> tuple[int, int]:
    """(trainable, total) parameter counts; ``without``: skip parameters under modules of that name."""
    params = [p for name, p in model.named_parameters() if without is None or f".{without}." not in f".{name}"]
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def has_readout(model: nn.Module) -> bool:
    return getattr(base_model(model), READOUT, None) is not None


def trainable_counts(model: nn.Module) -> dict:
    """Trainable and total counts, and the same without the gene decoder (the adapters' own share)."""
    trainable, total = count_parameters(model)
    counts = {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1)}
    if has_readout(model):
        t, n = count_parameters(model, without=READOUT)
        counts.update(trainable_without_decoder=t, total_without_decoder=n, fraction_without_decoder=t / max(n, 1))
    return counts


def trainable_summary(model: nn.Module) -> str:
    c = trainable_counts(model)
    text = f"trainable params: {c['trainable']:,} / {c['total']:,} ({100 * c['fraction']:.2f}%)"
    if "trainable_without_decoder" in c:
        text += (f"; without the gene decoder: {c['trainable_without_decoder']:,} / {c['total_without_decoder']:,} "
                 f"({100 * c['fraction_without_decoder']:.2f}%)")
    return text
