"""scvelo velocity in the model's space: agrees with the simulated truth, leaves counts alone, caches."""

import os

import anndata as ad
import numpy as np
import pytest

from stlib.data import synthetic as syn
from stlib.data import velocity as vel

SCVELO = pytest.mark.slow  # runs scvelo's whole pipeline (moments, dynamics, projection): seconds, not a unit test


@pytest.fixture(scope="module")
def raw():
    return syn.make_wound_healing(n_cells=1500, n_genes=300, seed=0)


@pytest.fixture(scope="module")
def small():
    return syn.make_wound_healing(n_cells=400, n_genes=300, seed=1)


@pytest.fixture(scope="module")
def with_velocity(raw):
    return vel.compute_velocity(raw.copy(), embed_key="X_state")


def _mean_cos(a, b):
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)).mean())


@SCVELO
def test_outputs_and_inputs_untouched(raw, with_velocity):
    adata = with_velocity
    v = adata.obsm["velocity_X_state"]
    assert v.shape == adata.obsm["X_state"].shape
    conf = adata.obs["velocity_confidence"].to_numpy()
    assert np.isfinite(v).all() and np.isfinite(conf).all()
    assert conf.min() >= 0 and conf.max() <= 1
    assert adata.uns["stlib_velocity"]["embed_key"] == "X_state"
    assert adata.shape == raw.shape
    assert (adata.X != raw.X).nnz == 0  # X keeps the raw counts
    for layer in ("spliced", "unspliced", "log1p"):
        assert (adata.layers[layer] != raw.layers[layer]).nnz == 0, layer
    assert set(adata.obsm) == set(raw.obsm) | {"velocity_X_state"}


@SCVELO
def test_velocity_agrees_with_the_truth(with_velocity):
    """Measured mean cosine 0.58-0.67 over seeds 0-2 at this size (0.87 at the default 6000 x 1000)."""
    adata = with_velocity
    v, truth = adata.obsm["velocity_X_state"], adata.obsm["true_velocity_X_state"]
    confident = adata.obs["velocity_confidence"].to_numpy() > 0.5
    assert confident.mean() > 0.5
    cos = _mean_cos(v[confident], truth[confident])
    assert cos > 0.4, cos
    shuffled = np.random.default_rng(0).permutation(len(v))
    assert cos > _mean_cos(v, truth[shuffled]) + 0.1  # per-cell agreement, not only a shared drift


@SCVELO
def test_embed_key_without_x_prefix_gives_the_same_velocity(small):
    ref = vel.compute_velocity(small.copy(), embed_key="X_state", n_neighbors=15, n_pcs=10)
    adata = small.copy()
    adata.obsm["state_copy"] = adata.obsm["X_state"].copy()
    vel.compute_velocity(adata, embed_key="state_copy", n_neighbors=15, n_pcs=10)
    np.testing.assert_allclose(adata.obsm["velocity_state_copy"], ref.obsm["velocity_X_state"], atol=1e-5)
    assert not any("stlib_velocity_basis" in k for k in adata.obsm)
    vel.compute_velocity(adata, embed_key="X", n_neighbors=15, n_pcs=10)  # the expression matrix as the space
    assert adata.obsm["velocity_X"].shape == (small.n_obs, small.n_vars)


def test_missing_layers_are_named(raw):
    adata = raw[:50].copy()
    del adata.layers["unspliced"]
    with pytest.raises(vel.VelocityError, match=r"unspliced.*layers present: .*spliced"):
        vel.compute_velocity(adata)


def test_unknown_embed_key_lists_obsm_keys(raw):
    with pytest.raises(vel.VelocityError, match="X_state"):
        vel.compute_velocity(raw[:50].copy(), embed_key="X_pca")
    with pytest.raises(vel.VelocityError, match="stochastic"):
        vel.compute_velocity(raw[:50].copy(), mode="fast")


@SCVELO
def test_run_velocity_writes_then_hits_cache(small, tmp_path, monkeypatch):
    src = tmp_path / "small.h5ad"
    small.write_h5ad(src)
    out = vel.run_velocity(src, "X_state", n_neighbors=15, n_pcs=10)
    assert out == tmp_path / "small.velocity.h5ad"
    back = ad.read_h5ad(out)
    assert back.obsm["velocity_X_state"].shape == (400, 64)
    assert back.uns["stlib_velocity"]["embed_key"] == "X_state"

    calls = []
    real = vel._velocity_in_place
    monkeypatch.setattr(vel, "_velocity_in_place", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert vel.run_velocity(src, "X_state", n_neighbors=15, n_pcs=10) == out
    assert calls == []  # cache hit
    vel.run_velocity(src, "X_state", n_neighbors=10, n_pcs=10)
    assert len(calls) == 1  # other parameters: recomputed
    stamp = os.path.getmtime(out) + 10
    os.utime(src, (stamp, stamp))  # input newer than output: recomputed
    vel.run_velocity(src, "X_state", n_neighbors=10, n_pcs=10)
    assert len(calls) == 2
    vel.run_velocity(src, "X_state", n_neighbors=10, n_pcs=10, force=True)
    assert len(calls) == 3


@SCVELO
def test_run_velocity_in_place(small, tmp_path):
    path = tmp_path / "inplace.h5ad"
    small.write_h5ad(path)
    assert vel.run_velocity(path, "X_state", out_path=path, n_neighbors=15, n_pcs=10) == path
    back = ad.read_h5ad(path)
    assert "velocity_X_state" in back.obsm and (back.X != small.X).nnz == 0
    assert vel.is_cached(path, path, dict(back.uns["stlib_velocity"]))


@SCVELO
def test_control_velocity_does_not_depend_on_the_perturbed_cells(small):
    """No perturbed (held-out or not) cell shapes the velocity the models read: the controls' is the same without them."""
    sham = (small.obs["condition"] == "Sham").to_numpy()
    full = vel.compute_velocity(small.copy(), "X_state", n_neighbors=15, n_pcs=10, pert_col="condition",
                                control_pert="Sham")
    alone = vel.compute_velocity(small[sham].copy(), "X_state", n_neighbors=15, n_pcs=10, pert_col="condition",
                                 control_pert="Sham")
    v_full, v_alone = full.obsm["velocity_X_state"], alone.obsm["velocity_X_state"]
    np.testing.assert_allclose(v_full[sham], v_alone, atol=1e-5)
    np.testing.assert_allclose(full.obs["velocity_confidence"].to_numpy()[sham],
                               alone.obs["velocity_confidence"].to_numpy(), atol=1e-5)
    assert np.abs(v_full[sham]).max() > 0
    assert not v_full[~sham].any() and not full.obs["velocity_confidence"].to_numpy()[~sham].any()
    assert full.uns["stlib_velocity"]["control_pert"] == "Sham"


def test_control_selection_errors_name_the_flag(raw):
    with pytest.raises(vel.VelocityError, match=r"--pert-col 'treatment' is not an obs column.*'condition'"):
        vel.compute_velocity(raw[:50].copy(), pert_col="treatment", control_pert="Sham")
    with pytest.raises(vel.VelocityError, match=r"--control-pert 'PBS' marks 0 cell\(s\).*'Burn', 'Sham'"):
        vel.compute_velocity(raw.copy(), pert_col="condition", control_pert="PBS")
    with pytest.raises(vel.VelocityError, match="both pert_col and control_pert"):
        vel.compute_velocity(raw[:50].copy(), pert_col="condition")


@SCVELO
def test_parallel_velocity_graph_changes_nothing(small):
    """--n-jobs is a speed-up only: the velocity graph in two processes gives the same field."""
    kw = {"n_neighbors": 15, "n_pcs": 10, "pert_col": "condition", "control_pert": "Sham"}
    one = vel.compute_velocity(small.copy(), "X_state", n_jobs=1, **kw).obsm["velocity_X_state"]
    two = vel.compute_velocity(small.copy(), "X_state", n_jobs=2, **kw).obsm["velocity_X_state"]
    np.testing.assert_allclose(two, one, atol=1e-6)


@SCVELO
def test_run_velocity_from_the_file_equals_the_in_memory_computation_and_copies_the_rest(small, tmp_path):
    """run_velocity reads only the control cells' layers and embedding: the same velocity as compute_velocity on the
    whole AnnData, every other element of the file unchanged, and a re-run in place does not grow the file."""
    path = tmp_path / "study.h5ad"
    adata = small.copy()
    adata.obsm["X_other"] = np.arange(adata.n_obs * 3, dtype=np.float32).reshape(adata.n_obs, 3)
    adata.write_h5ad(path)
    kwargs = {"n_neighbors": 15, "n_pcs": 10, "pert_col": "condition", "control_pert": "Sham"}
    expected = vel.compute_velocity(adata.copy(), "X_state", **kwargs)
    assert vel.run_velocity(path, "X_state", out_path=path, **kwargs) == path
    back = ad.read_h5ad(path)
    np.testing.assert_allclose(back.obsm["velocity_X_state"], expected.obsm["velocity_X_state"], atol=1e-6)
    np.testing.assert_allclose(back.obs["velocity_confidence"], expected.obs["velocity_confidence"], atol=1e-6)
    assert (back.X != adata.X).nnz == 0 and (back.layers["unspliced"] != adata.layers["unspliced"]).nnz == 0
    np.testing.assert_array_equal(back.obsm["X_other"], adata.obsm["X_other"])
    assert back.obs.drop(columns="velocity_confidence").equals(adata.obs)
    assert vel.is_cached(path, path, dict(back.uns["stlib_velocity"]))
    size = path.stat().st_size
    vel.run_velocity(path, "X_state", out_path=path, force=True, **kwargs)
    assert path.stat().st_size <= size + 64 * 1024  # the velocity overwritten where it was, not appended


@SCVELO
def test_run_velocity_names_a_missing_layer_before_reading_the_matrices(small, tmp_path):
    path = tmp_path / "no_unspliced.h5ad"
    adata = small.copy()
    del adata.layers["unspliced"]
    adata.write_h5ad(path)
    with pytest.raises(vel.VelocityError, match=r"missing \['unspliced'\]"):
        vel.run_velocity(path, "X_state")
    small.write_h5ad(tmp_path / "whole.h5ad")
    with pytest.raises(vel.VelocityError, match="embed_key='X_nope' is not in obsm"):
        vel.run_velocity(tmp_path / "whole.h5ad", "X_nope")
