"""The embedded default data: conventions, determinism, a recoverable Burn effect, the shared embedding."""

import anndata as ad
import numpy as np
import pytest
import scanpy as sc

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from stlib.data import synthetic as syn

WOUND_OBS = ("condition", "day", "mouse_id", "cell_types_simple_short", "pseudotime")


@pytest.fixture(scope="module")
def wound():
    return syn.make_wound_healing(n_cells=6000, n_genes=400, seed=0)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("default_data")
    paths = syn.write_default_data(out, n_cells=900, n_genes=300, embed_dim=16, n_source_cells=700, seed=3)
    return paths


def _cos(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def test_wound_layout_and_counts(wound):
    assert wound.shape == (6000, 400)
    for col in WOUND_OBS:
        assert col in wound.obs, col
    assert set(wound.obs["condition"].unique()) == {"Sham", "Burn"}
    assert sorted(wound.obs["day"].unique()) == [10, 14, 19]
    assert {"Keratinocyte", "Fibroblast", "Macrophage", "Neutrophil", "Endothelial", "Tcell"} <= set(
        wound.obs["cell_types_simple_short"].unique()
    )
    assert all(" " not in ct for ct in wound.obs["cell_types_simple_short"].unique())
    for layer in ("spliced", "unspliced"):
        m = wound.layers[layer]
        assert np.issubdtype(m.dtype, np.integer) and m.min() >= 0, layer
    assert np.issubdtype(wound.X.dtype, np.integer)
    assert (wound.X != wound.layers["spliced"]).nnz == 0  # X is the spliced counts
    assert wound.layers["unspliced"].sum() > 0.1 * wound.layers["spliced"].sum()
    assert 0.1 < (wound.X.toarray() == 0).mean() < 0.9  # sparse but not empty
    assert wound.obsm["X_state"].shape == (6000, 64)
    assert wound.obsm["true_velocity_X_state"].shape == (6000, 64)
    assert ((wound.obs["pseudotime"] >= 0) & (wound.obs["pseudotime"] <= 1)).all()


def test_log1p_layer_is_normalize_total_then_log1p(wound):
    ref = ad.AnnData(wound.X[:200].astype(np.float32))
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    assert wound.layers["log1p"].dtype == np.float32
    np.testing.assert_allclose(wound.layers["log1p"][:200].toarray(), ref.X.toarray(), rtol=1e-4, atol=1e-4)


def test_mice_are_one_condition_and_day_each(wound):
    per_mouse = wound.obs.groupby("mouse_id", observed=True)[["condition", "day"]].nunique()
    assert len(per_mouse) == 18
    assert (per_mouse == 1).all().all()
    mice_per_group = wound.obs.groupby(["condition", "day"], observed=True)["mouse_id"].nunique()
    assert (mice_per_group == 3).all()


def test_heldout_mice_are_burn_one_val_and_one_test_per_day(wound):
    from stlib.data.synthetic import heldout_mice

    held = heldout_mice()
    obs = wound.obs.drop_duplicates("mouse_id").set_index("mouse_id")
    assert set(obs.loc[list(held), "condition"]) == {"Burn"}
    for split in ("val", "test"):
        assert sorted(obs.loc[[m for m, s in held.items() if s == split], "day"]) == [10, 14, 19]


def test_deterministic_for_a_seed():
    a = syn.make_wound_healing(n_cells=300, n_genes=300, seed=5)
    b = syn.make_wound_healing(n_cells=300, n_genes=300, seed=5)
    c = syn.make_wound_healing(n_cells=300, n_genes=300, seed=6)
    assert (a.X != b.X).nnz == 0 and (a.layers["unspliced"] != b.layers["unspliced"]).nnz == 0
    np.testing.assert_array_equal(a.obsm["X_state"], b.obsm["X_state"])
    assert (a.X != c.X).nnz > 0


def test_burn_effect_recoverable_at_day_10(wound):
    """Observed Burn - Sham mean log1p difference per cell type matches the stored truth."""
    truth = wound.uns["ground_truth"]
    expr, obs = wound.layers["log1p"].toarray(), wound.obs
    rs = []
    for c, ct in enumerate(truth["cell_types"]):
        sel = ((obs["cell_types_simple_short"] == ct) & (obs["day"] == 10)).to_numpy()
        burn = expr[sel & (obs["condition"] == "Burn").to_numpy()].mean(0)
        sham = expr[sel & (obs["condition"] == "Sham").to_numpy()].mean(0)
        rs.append(np.corrcoef(burn - sham, truth["effect_log1p"][c, 0])[0, 1])
    assert np.median(rs) > 0.85, rs
    assert min(rs) > 0.6, rs  # the least responsive, rarest type (Pericyte) is the noisiest


def test_burn_effect_fades_with_day(wound):
    truth = wound.uns["ground_truth"]
    norms = np.linalg.norm(truth["effect_log1p"], axis=-1)  # [C, T]
    assert (np.diff(norms, axis=1) < 0).all()
    # and in the data: the inflammation program's Burn - Sham difference shrinks from day 10 to day 19
    infl = truth["programs"]["inflammation"]
    expr, obs = wound.layers["log1p"].toarray()[:, infl], wound.obs
    gap = {}
    for day in (10, 19):
        at = (obs["day"] == day).to_numpy()
        gap[day] = (
            expr[at & (obs["condition"] == "Burn").to_numpy()].mean()
            - expr[at & (obs["condition"] == "Sham").to_numpy()].mean()
        )
    assert gap[10] > 0.2 and gap[19] < 0.5 * gap[10], gap


def test_burn_pushes_cells_forward_along_their_trajectory(wound):
    obs = wound.obs[wound.obs["day"] == 10]
    mean_t = obs.groupby(["cell_types_simple_short", "condition"], observed=True)["pseudotime"].mean().unstack()
    assert (mean_t["Burn"] > mean_t["Sham"] + 0.05).all()


def test_held_out_types_need_more_than_the_mean_shift(wound):
    """Zero-shot design: a held-out type's effect shares a part with the training types, but not all of it."""
    truth = wound.uns["ground_truth"]
    names = list(truth["cell_types"])
    effect = truth["effect_log1p"][:, 0]
    train_mean = effect[[i for i, ct in enumerate(names) if ct not in syn.ZEROSHOT]].mean(0)
    for ct in syn.ZEROSHOT:
        e = effect[names.index(ct)]
        assert np.corrcoef(e, train_mean)[0, 1] > 0.5, ct  # shared, learnable part
        assert np.linalg.norm(e - train_mean) > 0.3 * np.linalg.norm(e), ct  # state-dependent part


def test_true_velocity_points_to_later_pseudotime(wound):
    """Per cell type, the mean true velocity of early cells points from early to later cells' embedding."""
    obs, emb, vel = wound.obs, wound.obsm["X_state"], wound.obsm["true_velocity_X_state"]
    for ct in obs["cell_types_simple_short"].cat.categories:
        sham = ((obs["cell_types_simple_short"] == ct) & (obs["condition"] == "Sham")).to_numpy()
        t = obs["pseudotime"].to_numpy()
        early, mid = sham & (t > 0.1) & (t < 0.3), sham & (t > 0.3) & (t < 0.5)
        step = emb[mid].mean(0) - emb[early].mean(0)
        assert _cos(vel[early].mean(0), step) > 0.5, ct


def test_embedding_reproducible_and_shared(written):
    emap = syn.load_embedding_map(written["embedding_map"])
    wound = ad.read_h5ad(written["wound_healing"])
    source = ad.read_h5ad(written["source_perturbations"])
    assert list(wound.var_names) == list(source.var_names) == list(emap["var_names"])
    for adata in (wound, source):
        assert adata.obsm["X_state"].shape[1] == 16
        np.testing.assert_allclose(syn.embed_expression(adata.X, emap), adata.obsm["X_state"], atol=1e-4)
        np.testing.assert_allclose(
            syn.embed_expression(adata.X, written["embedding_map"]), adata.obsm["X_state"], atol=1e-4
        )
        assert adata.uns["embedding"]["file"] == written["embedding_map"].name
    with pytest.raises(ValueError, match="genes"):
        syn.embed_expression(wound.X[:, :10], emap)


def test_ground_truth_round_trips_through_h5ad(written):
    wound = ad.read_h5ad(written["wound_healing"])
    truth = wound.uns["ground_truth"]
    n_types, n_days = len(truth["cell_types"]), len(truth["days"])
    assert truth["effect_log1p"].shape == (n_types, n_days, wound.n_vars)
    assert truth["effect_embedding"].shape == (n_types, n_days, 16)
    assert set(truth["programs"]) >= {"inflammation", "maturation", "receptor"}


def test_source_domain(written):
    src = ad.read_h5ad(written["source_perturbations"])
    drugs = set(src.obs["drug"].unique())
    assert syn.SOURCE_CONTROL in drugs and 10 <= len(drugs) - 1 <= 30
    assert 3 <= src.obs["cell_line"].nunique() <= 5
    assert not set(src.obs["cell_line"]) & set(syn.CELL_TYPES)
    assert "plate" in src.obs and "log1p" in src.layers
    assert np.issubdtype(src.X.dtype, np.integer)


def test_tomls_resolve_relative_to_their_folder(written):
    for name in ("wound_healing", "source_perturbations"):
        toml_path = written[f"{name}_toml"]
        cfg = tomllib.loads(toml_path.read_text())
        assert (toml_path.parent / cfg["datasets"][name]).resolve() == written[name].resolve()
        assert cfg["training"] == {name: "train"}
        assert cfg["fewshot"] == {}
    wh = tomllib.loads(written["wound_healing_toml"].read_text())
    assert sorted(wh["zeroshot"].values()) == ["test", "test", "val"]
    cell_types = set(ad.read_h5ad(written["wound_healing"]).obs["cell_types_simple_short"])
    assert {k.split(".", 1)[1] for k in wh["zeroshot"]} <= cell_types


def test_state_toml_writer_round_trips_fewshot(tmp_path):
    path = syn.write_state_toml(
        tmp_path / "x.toml",
        datasets={"ds": "/abs/path with space/ds.h5ad"},
        training={"ds": "train"},
        zeroshot={"ds.Type A": "test"},
        fewshot={"ds.LineB": {"val": ["Drug01", 'we"ird'], "test": ["Drug02"]}},
    )
    assert tomllib.loads(path.read_text()) == {
        "datasets": {"ds": "/abs/path with space/ds.h5ad"},
        "training": {"ds": "train"},
        "zeroshot": {"ds.Type A": "test"},
        "fewshot": {"ds.LineB": {"val": ["Drug01", 'we"ird'], "test": ["Drug02"]}},
    }


def test_too_few_genes_is_a_clear_error():
    with pytest.raises(ValueError, match="n_genes=50"):
        syn.make_gene_programs(50)


def test_embedding_map_never_sees_a_held_out_cell_type_or_mouse(written):
    wound, source = ad.read_h5ad(written["wound_healing"]), ad.read_h5ad(written["source_perturbations"])
    emap = syn.load_embedding_map(written["embedding_map"])
    obs = wound.obs
    held = obs["cell_types_simple_short"].isin(list(syn.ZEROSHOT)) | obs["mouse_id"].isin(list(syn.heldout_mice()))
    seen = wound.layers["log1p"][np.flatnonzero(~held.to_numpy())]
    pooled = np.vstack([seen.toarray(), source.layers["log1p"].toarray()])
    np.testing.assert_allclose(emap["mean"], pooled.mean(0), rtol=1e-4, atol=1e-5)  # fitted on exactly these cells
    with_held = np.vstack([wound.layers["log1p"].toarray(), source.layers["log1p"].toarray()]).mean(0)
    assert np.abs(emap["mean"] - with_held).max() > 1e-3  # and the held-out cells would have changed it
