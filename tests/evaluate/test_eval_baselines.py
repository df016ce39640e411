"""The baselines are valid prediction files with the effect they claim."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stlib.evaluate.baselines import (
    BASELINES,
    additive_linear_baseline,
    celltype_time_shift_baseline,
    control_mean_baseline,
    mean_shift_baseline,
)
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
    shift = _group_mean(pred, "Burn|A|10", "X_emb") - _group_mean(real, "Sham|A|10", "X_emb")
    np.testing.assert_allclose(shift, stored["train_mean_shift_embedding"]["Burn"], rtol=1e-4, atol=1e-5)
    controls = real.X[(real.obs["group_id"] == "Sham|A|10").to_numpy()]  # genes floored at 0: log-expression
    expected = np.maximum(controls + stored["train_mean_shift_X"]["Burn"], 0).mean(axis=0)
    np.testing.assert_allclose(_group_mean(pred, "Burn|A|10"), expected, rtol=1e-4, atol=1e-5)
    assert pred.X.min() >= 0


def test_celltype_time_shift_uses_seen_cell_types_only(make_pair):
    _, real = make_pair("perfect")
    pred = celltype_time_shift_baseline(real)
    shift = _group_mean(pred, "Burn|B|14", "X_emb") - _group_mean(real, "Sham|B|14", "X_emb")
    groups = real.uns["stlib"]["train_groups"]
    row = np.flatnonzero((groups["cell_type"] == "B") & (groups["time"] == "14"))[0]
    np.testing.assert_allclose(shift, groups["embedding"][row], rtol=1e-4, atol=1e-5)  # that group's own shift
    seen_a = groups["cell_type"] == "A"
    real.uns["stlib"]["train_groups"] = {k: v[seen_a] for k, v in groups.items()}
    pred = celltype_time_shift_baseline(real)  # B unseen in training: its groups are left out
    assert set(pred.obs.loc[pred.obs["condition"] == "Burn", "cell_type"]) == {"A"}


def test_additive_linear_recovers_additive_effects(make_pair):
    from stlib.evaluate.baselines import additive_shifts

    _, real = make_pair("perfect", cell_types=("A", "B", "C"))
    groups = {k: np.asarray(v) for k, v in real.uns["stlib"]["train_groups"].items()}
    rng = np.random.default_rng(0)
    ct_effect = {c: rng.normal(size=4) for c in ("A", "B", "C")}
    t_effect = {t: rng.normal(size=4) for t in ("10", "14", "19")}
    groups["X"] = np.stack([1.0 + ct_effect[c] + t_effect[t] for c, t in zip(groups["cell_type"], groups["time"])])
    table = pd.DataFrame({"pert": ["Burn", "Burn"], "cell_type": ["B", "Z"], "time": [19, 10]})
    fitted = additive_shifts(groups, "X", table)
    np.testing.assert_allclose(fitted[0], 1.0 + ct_effect["B"] + t_effect["19"], atol=1e-8)  # exact when additive
    mean_ct = np.mean(list(ct_effect.values()), axis=0)  # unseen cell type Z: the average cell type
    np.testing.assert_allclose(fitted[1], 1.0 + mean_ct + t_effect["10"], atol=1e-8)
    assert additive_linear_baseline(real).X.min() >= 0


def test_baselines_predict_from_the_models_control_cells(make_pair):
    _, real = make_pair("perfect")
    model = control_mean_baseline(real)
    rng = np.random.default_rng(0)
    burn = (model.obs["condition"] == "Burn").to_numpy()
    sham = real.obs.loc[(real.obs["condition"] == "Sham").to_numpy(), ["cell_type", "day", "source_index"]]
    drawn = [rng.choice(sham.loc[(sham.cell_type == c) & (sham.day == d), "source_index"].to_numpy())
             for c, d in zip(model.obs.loc[burn, "cell_type"], model.obs.loc[burn, "day"])]
    model.obs.loc[burn, "basal_index"] = drawn  # a model's own draw of control cells
    for make in BASELINES.values():
        out = make(real, pred=model)
        np.testing.assert_array_equal(out.obs.loc[(out.obs["condition"] == "Burn").to_numpy(), "basal_index"],
                                      np.asarray(drawn))


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
    delta = _group_mean(out, "Burn|B|10", "X_emb") - _group_mean(real, "Sham|B|10", "X_emb")  # pert is Scald
    np.testing.assert_allclose(delta, -emb_shift, rtol=1e-4, atol=1e-5)
    real.uns["stlib"]["train_mean_shift_X"] = shift
    with pytest.raises(EvalError, match="2 perturbations"):
        mean_shift_baseline(real)
