"""Every plot returns a Figure that saves to a PNG PIL can open (one UMAP test: numba JIT is slow)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from stlib.evaluate.layout import EvalError
from stlib.evaluate.metrics import compute_metrics
from stlib.evaluate.plots import (
    ema,
    plot_grad_norms,
    plot_loss_curves,
    plot_metrics_heatmap,
    plot_umap_comparison,
)


def _saves(fig, tmp_path, name):
    assert isinstance(fig, Figure)
    path = tmp_path / f"{name}.png"
    fig.savefig(path, dpi=50)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
    return fig


def _scalars(seed, spike_at=None):
    rng = np.random.default_rng(seed)
    steps = np.arange(0, 300, 5)
    grad = 1.0 + 0.05 * rng.standard_normal(len(steps))
    if spike_at is not None:
        grad[spike_at] = 20.0
    rows = [(s, "train/loss", 5.0 / (1 + s / 50) + 0.1 * rng.standard_normal(), float(s)) for s in steps]
    rows += [(s, "train/grad_norm", g, float(s)) for s, g in zip(steps, grad)]
    rows += [(s, "val/loss", 5.0 / (1 + s / 50), float(s)) for s in steps[::10]]
    return pd.DataFrame(rows, columns=["step", "tag", "value", "wall_time"])


def test_ema_is_debiased_and_smooths():
    assert ema(np.full(5, 3.0)) == pytest.approx(np.full(5, 3.0))
    noisy = np.tile([0.0, 2.0], 50)
    assert np.ptp(ema(noisy)[-20:]) < 0.5 * np.ptp(noisy)


def test_training_plots_save(tmp_path):
    scalars = {"lora": _scalars(0), "lora_mhc": _scalars(1, spike_at=40)}
    fig = _saves(plot_loss_curves(scalars), tmp_path, "loss")
    assert len(fig.axes) == 2 and len(fig.axes[1].lines) == 2
    fig = _saves(plot_grad_norms(scalars), tmp_path, "grad")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["lora (0 spikes)", "lora_mhc (1 spikes)"]
    _saves(plot_loss_curves({"empty": _scalars(0).iloc[:0]}), tmp_path, "empty")  # nothing logged: still a figure


def test_metrics_heatmap(make_pair, tmp_path):
    rows, tables = [], []
    for kind in ("perfect", "reversed", "control"):
        summary, per_ct = compute_metrics(*make_pair(kind))
        rows.append({"model": kind, **summary})
        tables.append(per_ct.assign(model=kind))
    summary_df, per_ct_df = pd.DataFrame(rows), pd.concat(tables)
    fig = _saves(plot_metrics_heatmap(summary_df, per_ct_df, metric="direction_cosine"), tmp_path, "heat")
    assert len(fig.axes) == 2
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == ["A", "B", "all"]
    with pytest.raises(EvalError, match="nope"):
        plot_metrics_heatmap(summary_df, metrics=["nope"])


@pytest.mark.slow  # umap/pynndescent compile their numba kernels on import (~15 s per process)
def test_umap_comparison_one_shared_embedding(make_pair, tmp_path):
    pred, real = make_pair("resampled", n=15)
    control = make_pair("control", n=15)[0]
    fig = _saves(plot_umap_comparison(real, {"model": pred, "control_mean": control}, max_cells=100), tmp_path, "umap")
    assert len(fig.axes) == 4  # 2 rows (condition, cell type) x 2 models
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert legend == ["Sham", "Burn (real)", "Burn (predicted)"]
    # both panels of a row share coordinates: the real cells sit at the same place
    offsets = [ax.collections[1].get_offsets() for ax in fig.axes[:2]]
    np.testing.assert_allclose(offsets[0], offsets[1])
