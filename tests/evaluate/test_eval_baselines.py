"""The baselines are valid prediction files with the effect they claim."""

from __future__ import annotations

import numpy as np
import pytest

from stlib.evaluate.baselines import BASELINES, control_mean_baseline, mean_shift_baseline
from stlib.evaluate.layout import EvalError


def _group_mean(adata, group, rep="X"):
    mat = adata.X if rep == "X" else adata.obsm[rep]
    return np.asarray(mat[(adata.obs["group_id"] == group).to_numpy()], dtype=np.float64).mean(axis=0)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_have_the_pred_layout(make_pair, name, tmp_path):
    _, real = make_pair("perfect")
    pred = BASELINES[name](real)
    assert list(pred.var_names) == list(real.var_names)
    assert pred.obs_names.is_unique
    assert set(real.obs.columns) <= set(pred.obs.columns)
    assert pred.uns["stlib"]["model"] == name and real.uns["stlib"]["model"] == "real"
    assert set(pred.obs["group_id"]) == set(real.obs["group_id"])
    assert set(pred.obs["condition"]) == {"Sham", "Burn"}
    assert list(pred.obsm) == ["X_emb"]
    sham = lambda a: a[(a.obs["condition"] == "Sham").to_numpy()]
    np.testing.assert_array_equal(sham(pred).obs["source_index"], sham(real).obs["source_index"])
    np.testing.assert_array_equal(pred.obs["basal_index"], pred.obs["source_index"])  # each row from itself
    burn = pred[(pred.obs["group_id"] == "Burn|B|14").to_numpy()]
    assert set(burn.obs["day"]) == {14} and set(burn.obs["cell_type"]) == {"B"}
    assert burn.obs["mouse_id"].astype(str).str.startswith("Burn").all()  # the group's batch, not the control's
    assert pred.obs["day"].dtype == real.obs["day"].dtype
    pred.write_h5ad(tmp_path / f"{name}_pred.h5ad")  # h5ad-writable obs


def test_control_mean_predicts_the_matching_controls(make_pair):
    _, real = make_pair("perfect")
    pred = control_mean_baseline(real)
    np.testing.assert_allclose(_group_mean(pred, "Burn|A|19"), _group_mean(real, "Sham|A|19"), rtol=1e-6)


def test_mean_shift_adds_the_training_shift_in_x_and_embedding(make_pair):
    _, real = make_pair("perfect")
    pred = mean_shift_baseline(real)
    stored = real.uns["stlib"]
    for rep, key in (("X", "train_mean_shift_X"), ("X_emb", "train_mean_shift_embedding")):
        shift = _group_mean(pred, "Burn|A|10", rep) - _group_mean(real, "Sham|A|10", rep)
        np.testing.assert_allclose(shift, stored[key]["Burn"], rtol=1e-4, atol=1e-5)


def test_mean_shift_accepts_one_array_and_names_missing_entries(make_pair):
    _, real = make_pair("perfect")
    real.uns["stlib"]["train_mean_shift_X"] = real.uns["stlib"]["train_mean_shift_X"]["Burn"]
    assert mean_shift_baseline(real).n_obs == control_mean_baseline(real).n_obs
    real.uns["stlib"]["train_mean_shift_X"] = {"Other": np.zeros(real.n_vars)}
    with pytest.raises(EvalError, match="'Burn'.*'Other'"):
        mean_shift_baseline(real)
    del real.uns["stlib"]["train_mean_shift_X"]
    with pytest.raises(EvalError, match="train_mean_shift_X"):
        mean_shift_baseline(real)


def test_several_perturbations_need_a_shift_per_perturbation(make_pair):
    from stlib.evaluate.metrics import compute_metrics

    pred, real = make_pair("perfect")
    for adata in (pred, real):  # cell type B's Burn becomes a second perturbation, "Scald"
        scald = ((adata.obs["condition"] == "Burn") & (adata.obs["cell_type"] == "B")).to_numpy()
        adata.obs["condition"] = adata.obs["condition"].cat.add_categories("Scald")
        adata.obs.loc[scald, "condition"] = "Scald"
    summary, _ = compute_metrics(pred, real)
    assert summary["gene_correlation"] == pytest.approx(1.0) and summary["n_groups"] == 6
    shift = real.uns["stlib"]["train_mean_shift_X"]["Burn"]
    real.uns["stlib"]["train_mean_shift_X"] = {"Burn": shift, "Scald": -shift}
    with pytest.raises(EvalError, match="train_mean_shift_embedding.*'Scald'"):
        mean_shift_baseline(real)
    emb_shift = real.uns["stlib"]["train_mean_shift_embedding"]["Burn"]
    real.uns["stlib"]["train_mean_shift_embedding"] = {"Burn": emb_shift, "Scald": -emb_shift}
    out = mean_shift_baseline(real)
    delta = _group_mean(out, "Burn|B|10") - _group_mean(real, "Sham|B|10")  # group ids kept; pert is Scald
    np.testing.assert_allclose(delta, -shift, rtol=1e-4, atol=1e-5)
    real.uns["stlib"]["train_mean_shift_X"] = shift
    with pytest.raises(EvalError, match="2 perturbations"):
        mean_shift_baseline(real)
