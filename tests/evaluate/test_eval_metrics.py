"""Known-answer cases for the accuracy metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stlib.evaluate.layout import EvalError
from stlib.evaluate.metrics import (
    compute_metrics,
    direction_cosine,
    energy_distance,
    evaluate_files,
    group_metrics,
    temporal_coherence,
    write_metrics,
)


def test_perfect_prediction_scores_perfectly(make_pair):
    summary, per_ct = compute_metrics(*make_pair("perfect"))
    assert summary["gene_correlation"] == pytest.approx(1.0)
    assert summary["direction_cosine"] == pytest.approx(1.0)
    assert summary["cell_distance"] == pytest.approx(0.0, abs=1e-6)
    assert summary["mse"] == pytest.approx(0.0, abs=1e-12)
    assert summary["emb_gene_correlation"] == pytest.approx(1.0)
    assert summary["temporal_coherence"] == pytest.approx(1.0)
    assert list(per_ct["cell_type"]) == ["A", "B", "all"]
    assert list(per_ct["n_groups"]) == [3, 3, 6]


def _from_biased_controls(real):
    """Each Burn group predicted exactly (its real shift) but from the half of its controls highest in gene 0."""
    pred = real.copy()
    obs = real.obs
    sham = (obs["condition"] == "Sham").to_numpy()
    basal = obs["source_index"].to_numpy().copy()
    for gid in obs.loc[~sham, "group_id"].unique():
        rows = np.flatnonzero((obs["group_id"] == gid).to_numpy())
        ct, day = obs["cell_type"].iloc[rows[0]], obs["day"].iloc[rows[0]]
        ctrl = np.flatnonzero(sham & (obs["cell_type"] == ct).to_numpy() & (obs["day"] == day).to_numpy())
        high = ctrl[np.argsort(real.X[ctrl, 0])[len(ctrl) // 2:]]
        used = high[np.arange(len(rows)) % len(high)]
        shift = real.X[rows].mean(0) - real.X[ctrl].mean(0)
        pred.X[rows] = real.X[used] + shift
        basal[rows] = obs["source_index"].to_numpy()[used]
    pred.obs["basal_index"] = basal
    return pred


def test_predicted_shift_is_taken_from_the_controls_it_was_made_from(make_pair):
    """A model that adds exactly the real shift to a biased draw of controls predicts the shift exactly; only
    measured from all controls would the draw's bias count against it."""
    _, real = make_pair("perfect", space="embedding")
    pred = _from_biased_controls(real)
    groups = group_metrics(pred, real)
    assert groups["gene_correlation"].min() == pytest.approx(1.0)
    assert groups["direction_cosine"].min() == pytest.approx(1.0)
    unnamed = pred.copy()
    del unnamed.obs["basal_index"]
    assert group_metrics(unnamed, real)["gene_correlation"].min() < 0.999  # the draw's bias counted
    missing = pred.copy()
    missing.obs["basal_index"] = missing.obs["basal_index"] + 10**6
    with pytest.warns(UserWarning, match="basal_index"):
        fallback = group_metrics(missing, real)
    np.testing.assert_allclose(fallback["direction_cosine"], group_metrics(unnamed, real)["direction_cosine"])


def test_resampled_cells_from_the_right_distribution_are_close(make_pair):
    summary, _ = compute_metrics(*make_pair("resampled"))
    assert summary["cell_distance"] < 0.1
    assert summary["gene_correlation"] > 0.95
    assert summary["direction_cosine"] > 0.95


def test_control_mean_prediction_is_no_better_than_no_change(make_pair):
    summary, _ = compute_metrics(*make_pair("control"))
    assert summary["cell_distance"] == pytest.approx(1.0, abs=1e-6)
    assert summary["direction_cosine"] == 0.0
    assert summary["gene_correlation"] == 0.0
    assert summary["temporal_coherence"] == 0.0  # no movement along time
    assert summary["mse"] > 0.1


def test_reversed_effect_has_cosine_minus_one(make_pair):
    summary, _ = compute_metrics(*make_pair("reversed"))
    assert summary["direction_cosine"] < -0.95
    assert summary["gene_correlation"] < -0.95
    assert summary["cell_distance"] > 1.0


def test_temporal_coherence_drops_when_days_are_shuffled(make_pair):
    good, _ = compute_metrics(*make_pair("resampled"))
    bad, per_ct = compute_metrics(*make_pair("shuffled_days"))
    assert good["temporal_coherence"] > 0.9
    assert bad["temporal_coherence"] < 0.0
    assert per_ct["temporal_coherence"].notna().all()


def test_temporal_coherence_is_nan_with_fewer_than_three_days(make_pair):
    summary, per_ct = compute_metrics(*make_pair("perfect", days=(10, 19)))
    assert np.isnan(summary["temporal_coherence"])
    assert per_ct["temporal_coherence"].isna().all()
    assert summary["gene_correlation"] == pytest.approx(1.0)


def test_temporal_coherence_known_answers():
    real = np.outer([1.0, 2.0, 4.0], np.ones(5))
    assert temporal_coherence(real, 3 * real + 1) == pytest.approx(1.0)  # same order and relative spacing
    even = np.outer([1.0, 2.0, 3.0], np.ones(5))
    assert temporal_coherence(even, even[::-1]) == pytest.approx(-1.0)  # order reversed
    assert temporal_coherence(real, real[::-1]) < -0.9
    unrelated = np.random.default_rng(0).standard_normal((3, 30))
    assert abs(temporal_coherence(np.outer([1.0, 2.0, 4.0], np.linspace(-1, 1, 30)), unrelated)) < 0.4
    assert temporal_coherence(real, np.ones_like(real)) == 0.0  # no movement
    assert np.isnan(temporal_coherence(np.ones_like(real), real))  # no real movement: undefined
    with pytest.raises(EvalError, match="shape"):
        temporal_coherence(real, real[:2])


def test_vector_scores_zero_conventions():
    real = np.array([1.0, -2.0, 0.5])
    assert direction_cosine(-real, real) == pytest.approx(-1.0)
    assert direction_cosine(np.zeros(3), real) == 0.0
    assert np.isnan(direction_cosine(real, np.zeros(3)))


def test_energy_distance_is_textbook_v_statistic():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((20, 4)), rng.standard_normal((25, 4)) + 1.0

    def mean_dist(a, b):
        return np.linalg.norm(a[:, None] - b[None], axis=-1).mean()

    expected = 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)
    assert energy_distance(x, y) == pytest.approx(expected, abs=1e-4)  # geomloss floors distances at 1e-4
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_embedding_space_files_have_no_emb_prefix_metrics(make_pair):
    summary, _ = compute_metrics(*make_pair("perfect", space="embedding"))
    assert "emb_gene_correlation" not in summary
    assert summary["gene_correlation"] == pytest.approx(1.0)


def test_subsampling_is_seeded(make_pair):
    pred, real = make_pair("resampled", n=30)
    a = group_metrics(pred, real, max_cells=10, seed=3)
    b = group_metrics(pred, real, max_cells=10, seed=3)
    pd.testing.assert_frame_equal(a, b)
    # the seed picks the cells: another seed, other cells (equal frames alone would pass without any subsampling)
    other = group_metrics(pred, real, max_cells=10, seed=4)
    assert not np.allclose(other["cell_distance"], a["cell_distance"])
    assert not np.allclose(group_metrics(pred, real)["cell_distance"], a["cell_distance"])


def test_keyword_settings_override_and_missing_settings_fail(make_pair):
    pred, real = make_pair("perfect")
    for adata in (pred, real):
        del adata.uns["stlib"]
    with pytest.raises(EvalError, match="pert_col"):
        compute_metrics(pred, real)
    summary, _ = compute_metrics(
        pred, real, pert_col="condition", control_pert="Sham", cell_type_key="cell_type", time_col="day", space="gene"
    )
    assert summary["gene_correlation"] == pytest.approx(1.0)


def test_mismatched_genes_and_groups_are_named(make_pair):
    pred, real = make_pair("perfect")
    pred.var_names = ["x"] + list(pred.var_names[1:])
    with pytest.raises(EvalError, match="position 0"):
        compute_metrics(pred, real)
    pred, real = make_pair("perfect")
    pred = pred[pred.obs["group_id"] != "Burn|A|10"].copy()
    with pytest.raises(EvalError, match="Burn\\|A\\|10"):
        compute_metrics(pred, real)


def test_evaluate_files_adds_baselines_and_writes_csvs(make_pair, tmp_path):
    for kind in ("perfect", "reversed"):
        pred, real = make_pair(kind)
        pred.write_h5ad(tmp_path / f"{kind}_pred.h5ad")
        real.write_h5ad(tmp_path / f"{kind}_real.h5ad")
    summary, per_ct = evaluate_files([tmp_path / "perfect_pred.h5ad", tmp_path / "reversed_pred.h5ad"])
    assert list(summary["model"]) == ["perfect", "reversed", "control_mean", "mean_shift", "celltype_time_shift",
                                      "additive_linear"]
    for metric in ("gene_correlation", "de_overlap_50", "temporal_coherence"):
        lo, mean, hi = summary[f"{metric}_lo"], summary[metric], summary[f"{metric}_hi"]
        assert ((lo <= mean + 1e-12) & (mean <= hi + 1e-12) | (mean.isna() & lo.isna())).all(), metric
    assert summary["de_overlap_50"].isna().all()  # 30 genes: fewer than the top 50

    by_model = summary.set_index("model")
    assert by_model.loc["perfect", "direction_cosine"] == pytest.approx(1.0)
    assert by_model.loc["control_mean", "cell_distance"] == pytest.approx(1.0, abs=1e-6)
    assert by_model.loc["mean_shift", "direction_cosine"] > 0.5  # the training shift points the right way
    assert set(per_ct["model"]) == set(summary["model"])
    paths = write_metrics(summary, per_ct, tmp_path / "out")
    assert [p.name for p in paths] == ["metrics_summary.csv", "metrics_per_celltype.csv"]
    assert pd.read_csv(paths[0]).shape == summary.shape
    # a file name is where the summary goes; its per-cell-type table lands beside it
    named = write_metrics(summary, per_ct, tmp_path / "study" / "lora_run.csv")
    assert named == (tmp_path / "study" / "lora_run.csv", tmp_path / "study" / "lora_run_per_celltype.csv")
    assert pd.read_csv(named[1]).shape == per_ct.shape
    default = write_metrics(summary, per_ct, tmp_path / "res" / "metrics_summary.csv")
    assert [p.name for p in default] == ["metrics_summary.csv", "metrics_per_celltype.csv"]

def test_de_scores_known_answers():
    from stlib.evaluate.metrics import de_scores

    rng = np.random.default_rng(0)
    real = rng.normal(size=200)
    assert de_scores(real, real) == {"de_overlap_50": 1.0, "de_direction_50": 1.0,
                                     "de_overlap_100": 1.0, "de_direction_100": 1.0}
    flipped = de_scores(-real, real)
    assert flipped["de_overlap_50"] == 1.0 and flipped["de_direction_50"] == 0.0  # right genes, wrong signs
    top = np.argsort(-np.abs(real))
    pred = np.zeros(200)
    pred[top[:25]] = real[top[:25]]  # half of the real top 50, the rest 0
    pred[top[150:175]] = 10 * real[top[150:175]]  # 25 unrelated genes predicted as the largest changes
    scores = de_scores(pred, real)
    assert scores["de_overlap_50"] == 0.5 and scores["de_direction_50"] == 0.5


def test_evaluate_files_names_the_missing_real_file(make_pair, tmp_path):
    pred, _ = make_pair("perfect")
    pred.write_h5ad(tmp_path / "lora_pred.h5ad")
    with pytest.raises(EvalError, match="lora_real.h5ad"):
        evaluate_files([tmp_path / "lora_pred.h5ad"])
    with pytest.raises(EvalError, match="_pred.h5ad"):
        evaluate_files([tmp_path / "lora.h5ad"])
