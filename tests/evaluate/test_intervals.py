"""Bootstrap intervals over held-out groups, paired differences, and the forest plot that shows them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stlib.evaluate.intervals import bootstrap_interval, paired_difference
from stlib.evaluate.plots import plot_metric_intervals


def test_interval_holds_the_mean_and_shrinks_with_more_groups():
    rng = np.random.default_rng(0)
    few, many = rng.normal(0.7, 0.1, 6), rng.normal(0.7, 0.1, 600)
    lo, hi = bootstrap_interval(few)
    assert lo < few.mean() < hi
    lo_many, hi_many = bootstrap_interval(many)
    assert hi_many - lo_many < (hi - lo) / 2  # ~1/sqrt(100) of the width in expectation
    assert bootstrap_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert np.isnan(bootstrap_interval([np.nan, np.nan])[0])
    assert bootstrap_interval([1.0, np.nan, 3.0]) == bootstrap_interval([1.0, 3.0])  # NaN groups skipped


def test_paired_difference_counts_wins_and_excludes_zero_only_for_a_real_gap():
    base = np.linspace(0.5, 0.9, 8)
    better = paired_difference(base + 0.05, base)
    assert (better["wins"], better["losses"], better["n_groups"]) == (8, 0, 8)
    assert better["diff_lo"] > 0  # every group better: the interval excludes 0
    noisy = paired_difference(base + np.array([0.05, -0.05] * 4), base)
    assert (noisy["wins"], noisy["losses"]) == (4, 4) and noisy["diff_lo"] < 0 < noisy["diff_hi"]


def test_forest_plot_one_panel_per_metric_and_a_clear_error(tmp_path):
    rows = [{"setting": s, "model": m, "gene_correlation": v, "gene_correlation_lo": v - 0.1,
             "gene_correlation_hi": v + 0.1, "mse": 0.1, "mse_lo": 0.05, "mse_hi": 0.2}
            for s in ("unseen_cell_type", "unseen_mouse") for m, v in (("st_lora", 0.7), ("mean_shift", 0.6))]
    fig = plot_metric_intervals(pd.DataFrame(rows))
    assert [ax.get_title() for ax in fig.axes] == ["gene_correlation (higher is better)", "mse (lower is better)"]
    assert [t.get_text() for t in fig.axes[-1].get_legend().get_texts()] == ["unseen_cell_type", "unseen_mouse"]
    fig.savefig(tmp_path / "forest.png")
    with pytest.raises(Exception, match="no metric with intervals"):
        plot_metric_intervals(pd.DataFrame(rows).drop(columns=["gene_correlation_lo", "mse_lo"]))
