"""PerturbationDataModule: validation before training, basal pairing, set sampling, collated batches, maps."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from _data_fixtures import CONTROL, data_cfg, make_adata, single_dataset, write_h5ad, write_toml

from stlib.data.datamodule import PerturbationDataModule, draw_rows, load_maps, read_perturbation_names
from stlib.data.errors import DataError

S, B = 8, 4
FEWSHOT_ZEROSHOT = '[zeroshot]\n"exp.B" = "test"\n[fewshot."exp.C"]\nval = ["p1"]\ntest = ["p2"]\n'


def make_dm(toml, S=S, B=B, pert_map=None, need_velocity=False, seed=0, **over) -> PerturbationDataModule:
    dm = PerturbationDataModule(data_cfg(toml, **over), S, B, pert_map=pert_map, need_velocity=need_velocity,
                                seed=seed)
    dm.setup()
    return dm


def batches(loader, n=None):
    out = []
    for i, batch in enumerate(loader):
        if n is not None and i >= n:
            break
        out.append(batch)
    return out


@pytest.fixture
def split_dm(tmp_path):
    return make_dm(single_dataset(tmp_path, extra=FEWSHOT_ZEROSHOT))


# ------------------------------------------------------------------------------------------ pairing


def _check_pairing(dm: PerturbationDataModule, batch: dict) -> None:
    obs = dm.adata.obs
    groups = dm.store.groups
    for b, gid in enumerate(batch["group_index"].tolist()):
        g = groups[gid]
        basal, target = batch["basal_obs_index"][b].numpy(), batch["target_obs_index"][b].numpy()
        assert (obs["condition"].to_numpy()[basal] == CONTROL).all()
        assert (obs["cell_types_simple_short"].to_numpy()[basal] == g.cell_type).all()
        assert (obs["mouse_id"].to_numpy()[basal] == g.batch).all()
        assert set(target) <= set(g.obs_indices)
        assert (obs["condition"].to_numpy()[target] == g.pert).all()
        # the gathered embeddings are those rows (column 0 holds the row number)
        assert torch.equal(batch["basal"][b, :, 0], torch.from_numpy(basal).float())
        assert torch.equal(batch["target"][b, :, 0], torch.from_numpy(target).float())
        assert batch["pert_index"][b] == dm.pert_map[g.pert]
        assert batch["cell_type_index"][b] == dm.cell_type_map[g.cell_type]
        assert (batch["batch_index"][b].numpy() == dm.batch_map[g.batch]).all()


def test_basal_cells_are_same_cell_type_and_batch_controls(split_dm):
    for batch in batches(split_dm.train_dataloader(), 5) + batches(split_dm.val_dataloader()):
        _check_pairing(split_dm, batch)


def test_every_split_draws_basal_from_controls_wherever_they_are(split_dm):
    labels = split_dm.split_labels
    val_groups = split_dm.groups("val")
    assert val_groups and all(g.cell_type == "C" and g.pert == "p1" for g in val_groups)
    for g in val_groups:  # fewshot: controls are in train, still the val groups' basal cells
        assert set(labels[g.basal_indices]) == {"train"}
    test_b = [g for g in split_dm.groups("test") if g.cell_type == "B"]
    assert {g.pert for g in test_b} == {CONTROL, "p1", "p2"}  # zeroshot: control groups are targets too
    assert all(set(labels[g.basal_indices]) == {"test"} for g in test_b)
    train_cells = np.concatenate([g.obs_indices for g in split_dm.groups("train")])
    assert set(labels[train_cells]) == {"train"}
    assert not any(g.cell_type == "B" for g in split_dm.groups("train"))


def test_batch_without_controls_falls_back_to_same_time_point(tmp_path):
    mice = (("m1", 10), ("m2", 14), ("m3", 14))
    adata = make_adata(mice=mice, cell_types=("A",), skip=[("A", CONTROL, "m3")])
    dm = make_dm(single_dataset(tmp_path, adata))
    g = next(g for g in dm.groups("train") if g.batch == "m3")
    obs = dm.adata.obs
    assert g.time == 14
    assert set(obs["mouse_id"].to_numpy()[g.basal_indices]) == {"m2"}  # the day-14 controls, not m1's day 10
    assert (obs["condition"].to_numpy()[g.basal_indices] == CONTROL).all()


def test_without_batch_col_basal_match_time(tmp_path):
    dm = make_dm(single_dataset(tmp_path), batch_col=None)
    obs = dm.adata.obs
    assert dm.n_batches is None and dm.batch_map is None
    for g in dm.groups("train"):
        assert g.batch is None
        assert set(obs["day"].to_numpy()[g.basal_indices]) == {g.time}
    batch = next(iter(dm.train_dataloader()))
    assert torch.equal(batch["batch_index"], torch.zeros(B, S, dtype=torch.long))


# ------------------------------------------------------------------------------------------ batches


def test_batch_keys_shapes_dtypes(split_dm):
    batch = next(iter(split_dm.train_dataloader()))
    d, p = split_dm.input_dim, split_dm.pert_dim
    expected = {"basal": ((B, S, d), torch.float32), "target": ((B, S, d), torch.float32),
                "pert": ((B, S, p), torch.float32), "pert_index": ((B,), torch.long),
                "cell_type_index": ((B,), torch.long), "batch_index": ((B, S), torch.long),
                "basal_obs_index": ((B, S), torch.long), "target_obs_index": ((B, S), torch.long),
                "group_index": ((B,), torch.long), "time_index": ((B,), torch.long),
                "control_set": ((B,), torch.bool)}
    assert set(batch) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert tuple(batch[key].shape) == shape and batch[key].dtype == dtype, key
    assert (d, p, split_dm.gene_dim) == (6, 3, None)
    onehot = batch["pert"].argmax(-1)
    assert torch.equal(onehot, batch["pert_index"][:, None].expand(B, S))
    assert torch.equal(batch["pert"].sum(-1), torch.ones(B, S))
    times = split_dm.adata.obs[split_dm.data_cfg.time_col].astype(str).to_numpy()
    for row, t in zip(batch["target_obs_index"].numpy(), batch["time_index"].numpy(), strict=True):
        assert set(times[row]) == {split_dm.time_values[t]}  # each set's time point is its target cells'


def test_control_set_marks_control_to_control_sets(split_dm):
    cfg = split_dm.data_cfg
    perts = split_dm.adata.obs[cfg.pert_col].astype(str).to_numpy()
    seen = set()
    for batch in batches(split_dm.train_dataloader(), 10):
        for row, is_control in zip(batch["target_obs_index"].numpy(), batch["control_set"].numpy(), strict=True):
            assert (set(perts[row]) == {cfg.control_pert}) == bool(is_control)
            seen.add(bool(is_control))
    assert seen == {True, False}  # both kinds drawn, so the check above saw each


def test_train_sets_without_replacement_for_large_groups(split_dm):
    for batch in batches(split_dm.train_dataloader(), 5):
        for row in batch["target_obs_index"]:
            assert len(set(row.tolist())) == S


def test_epoch_length(split_dm):
    sets = sum(math.ceil(g.size / S) for g in split_dm.groups("train"))
    assert split_dm.epoch_sets() == sets
    assert len(split_dm.train_dataloader()) == math.ceil(sets / B)
    assert sum(len(b["pert_index"]) for b in split_dm.train_dataloader()) == math.ceil(sets / B) * B


def test_val_sets_are_deterministic(tmp_path):
    toml = single_dataset(tmp_path, extra=FEWSHOT_ZEROSHOT)
    first, second = make_dm(toml), make_dm(toml)
    a = batches(first.val_dataloader())
    again = batches(first.val_dataloader())
    b = batches(second.val_dataloader())
    n_val = len(first.groups("val")) * 3
    assert sum(len(x["group_index"]) for x in a) == n_val
    for x, y, z in zip(a, again, b):
        assert torch.equal(x["target_obs_index"], y["target_obs_index"])
        assert torch.equal(x["basal_obs_index"], z["basal_obs_index"])
    other = batches(make_dm(toml, seed=1).val_dataloader())
    assert not all(torch.equal(x["target_obs_index"], y["target_obs_index"]) for x, y in zip(a, other))
    counts = np.bincount(np.concatenate([x["group_index"].numpy() for x in a]))
    assert set(counts[counts > 0]) == {3}  # sets_per_group sets for each val group


def test_train_stream_differs_between_epochs(split_dm):
    loader = split_dm.train_dataloader()
    e1, e2 = batches(loader, 1)[0], batches(loader, 1)[0]
    assert not torch.equal(e1["target_obs_index"], e2["target_obs_index"])


def test_small_group_replace_warns_once_and_uses_every_cell(tmp_path, caplog):
    toml = single_dataset(tmp_path, make_adata(cells_per_combo=5))
    with caplog.at_level(logging.WARNING, logger="stlib.data.datamodule"):
        dm = make_dm(toml)
    warnings = [r for r in caplog.records if "smaller than cell_set_len" in r.getMessage()]
    assert len(warnings) == 1 and "exp/A/p1/m1 (5 cells)" in warnings[0].getMessage()
    batch = next(iter(dm.train_dataloader()))
    for row in batch["target_obs_index"]:
        assert len(set(row.tolist())) == 5  # all 5 cells, 3 repeats


def test_small_group_error(tmp_path):
    with pytest.raises(DataError, match=r"smaller than cell_set_len=8.*exp/A/ctrl/m1 \(5 cells\).*small_group=replace"):
        make_dm(single_dataset(tmp_path, make_adata(cells_per_combo=5)), small_group="error")


def test_draw_rows_small_pool():
    rng = np.random.default_rng(0)
    rows = draw_rows(np.array([7, 8, 9]), 4, 5, rng)
    assert rows.shape == (4, 5)
    assert all(set(r) == {7, 8, 9} for r in rows)


@pytest.mark.parametrize("need_velocity", [False, True])
def test_velocity_fields_only_when_asked(tmp_path, need_velocity):
    dm = make_dm(single_dataset(tmp_path, make_adata(velocity=True)), need_velocity=need_velocity)
    batch = next(iter(dm.train_dataloader()))
    assert ("basal_velocity" in batch) == need_velocity
    assert ("basal_velocity_confidence" in batch) == need_velocity
    if need_velocity:
        vel = dm.adata.obsm["velocity_X_state"]
        assert batch["basal_velocity"].shape == (B, S, 6)
        assert np.allclose(batch["basal_velocity"].numpy(), vel[batch["basal_obs_index"].numpy()])
        conf = dm.adata.obs["velocity_confidence"].to_numpy()
        assert np.allclose(batch["basal_velocity_confidence"].numpy(), conf[batch["basal_obs_index"].numpy()])


@pytest.mark.parametrize("space", ["embedding", "gene", "all"])
def test_gene_targets_only_for_gene_spaces(tmp_path, space):
    dm = make_dm(single_dataset(tmp_path), output_space=space)
    batch = next(iter(dm.train_dataloader()))
    assert ("target_genes" in batch) == (space != "embedding")
    assert dm.gene_dim == (None if space == "embedding" else 5)
    if space != "embedding":
        layer = dm.adata.layers["log1p"]
        assert batch["target_genes"].dtype == torch.float32
        assert np.allclose(batch["target_genes"].numpy(), layer[batch["target_obs_index"].numpy()])


def test_sparse_gene_layer(tmp_path):
    import scipy.sparse as sp

    adata = make_adata()
    adata.X = sp.csr_matrix(adata.X)
    dm = make_dm(single_dataset(tmp_path, adata), output_space="gene", gene_layer=None)
    batch = next(iter(dm.train_dataloader()))
    assert np.allclose(batch["target_genes"].numpy(), adata.X.toarray()[batch["target_obs_index"].numpy()])


# ------------------------------------------------------------------------------------------ maps


def test_pert_map_with_aliases(tmp_path):
    given = {"DMSO": 0, CONTROL: 0, "drugX": 1, "p1": 2, "p2": 3}
    dm = make_dm(single_dataset(tmp_path), pert_map=given)
    assert dm.pert_map == given and dm.pert_dim == 4
    for batch in batches(dm.train_dataloader(), 3):
        names = [dm.store.groups[g].pert for g in batch["group_index"].tolist()]
        assert batch["pert_index"].tolist() == [given[n] for n in names]
        assert batch["pert"].shape[-1] == 4


def test_pert_map_missing_names(tmp_path):
    with pytest.raises(DataError, match=r"'p1', 'p2' are in the data but not in the given pert_map"):
        make_dm(single_dataset(tmp_path), pert_map={CONTROL: 0})


def test_pert_map_built_from_data_puts_control_first(tmp_path):
    adata = make_adata(perts=("a_drug", CONTROL, "z_drug"))
    assert make_dm(single_dataset(tmp_path, adata)).pert_map == {CONTROL: 0, "a_drug": 1, "z_drug": 2}


def test_perturbation_features(tmp_path):
    feats = {CONTROL: torch.zeros(7), "p1": torch.arange(7.0), "p2": torch.ones(7), "unused": torch.ones(7)}
    torch.save(feats, tmp_path / "feats.pt")
    dm = make_dm(single_dataset(tmp_path), perturbation_features_file=str(tmp_path / "feats.pt"))
    assert dm.pert_dim == 7
    batch = next(iter(dm.train_dataloader()))
    for b, gid in enumerate(batch["group_index"].tolist()):
        assert torch.equal(batch["pert"][b], feats[dm.store.groups[gid].pert].expand(S, 7))
    torch.save({CONTROL: torch.zeros(7)}, tmp_path / "few.pt")
    with pytest.raises(DataError, match=r"'p1', 'p2' have no vector in .*few\.pt"):
        make_dm(single_dataset(tmp_path), perturbation_features_file=str(tmp_path / "few.pt"))


def test_single_cell_line(tmp_path):
    dm = make_dm(single_dataset(tmp_path, make_adata(cell_types=("K562",))))
    assert dm.cell_type_map == {"K562": 0}
    batch = next(iter(dm.train_dataloader()))
    assert torch.equal(batch["cell_type_index"], torch.zeros(B, dtype=torch.long))
    _check_pairing(dm, batch)


def test_save_and_load_maps(split_dm, tmp_path):
    split_dm.save_maps(tmp_path / "run")
    maps = load_maps(tmp_path / "run")
    assert maps.pert == split_dm.pert_map and maps.cell_type == split_dm.cell_type_map
    assert maps.batch == split_dm.batch_map == {"m1": 0, "m2": 1}
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["cells"]["val"] == int((split_dm.split_labels == "val").sum()) > 0
    assert summary["dims"]["input_dim"] == 6
    assert len(summary["groups"]) == len(split_dm.store.groups)
    with pytest.raises(DataError, match="no pert_onehot_map.pt"):
        load_maps(tmp_path)


def test_folder_of_files_concatenated(tmp_path):
    write_h5ad(make_adata(seed=1), tmp_path / "data" / "a.h5ad")
    write_h5ad(make_adata(seed=2), tmp_path / "data" / "b.h5ad")
    write_h5ad(make_adata(cell_types=("D",)), tmp_path / "other.h5ad")
    toml = write_toml(tmp_path, '[datasets]\nexp = "data"\nextra = "other.h5ad"\n'
                                '[training]\nexp = "train"\n[zeroshot]\n"extra.D" = "val"\n')
    dm = make_dm(toml)
    n = make_adata().n_obs
    assert dm.adata.n_obs == 2 * n + make_adata(cell_types=("D",)).n_obs
    assert list(dm.adata.obs["dataset"].value_counts().sort_index()) == [2 * n, n // 3]  # categories in TOML order
    assert {g.dataset for g in dm.groups("val")} == {"extra"}
    assert read_perturbation_names(data_cfg(toml)) == [CONTROL, "p1", "p2"]


# ------------------------------------------------------------------------------------------ validation


def _broken(kind):
    adata = make_adata(velocity=True)
    if kind == "nan":
        adata.obsm["X_state"][[1, 5, 9], 2] = np.nan
    return adata


BAD_DATA = {
    "embed key": ({'embed_key': "X_pca"}, r"obsm 'X_pca' \(data\.embed_key\) not found.*'X_state'"),
    "pert col": ({'pert_col': "treatment"}, r"obs column 'treatment' \(data\.pert_col\).*'condition'"),
    "cell type key": ({'cell_type_key': "celltype"}, r"obs column 'celltype' \(data\.cell_type_key\)"),
    "batch col": ({'batch_col': "plate"}, r"obs column 'plate' \(data\.batch_col\).*'mouse_id'"),
    "time col": ({'time_col': "hour"}, r"obs column 'hour' \(data\.time_col\)"),
    "control": ({'control_pert': "DMSO"}, r"control 'DMSO' .*values there: 'ctrl', 'p1', 'p2'"),
    "gene layer": ({'output_space': "gene", 'gene_layer': "counts"}, r"layer 'counts' .*'log1p'"),
    "nan": ({}, r"NaN/inf in 3 of 216 cells"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_errors(tmp_path, case):
    over, pattern = BAD_DATA[case]
    with pytest.raises(DataError, match=pattern):
        make_dm(single_dataset(tmp_path, _broken(case)), **over)


def test_nan_velocity_gets_zero_weight(tmp_path, caplog):
    adata = make_adata(velocity=True)
    adata.obsm["velocity_X_state"][[0, 3], 1] = np.nan
    adata.obs.loc[adata.obs_names[7], "velocity_confidence"] = np.nan
    with caplog.at_level(logging.WARNING, logger="stlib.data.datamodule"):
        dm = make_dm(single_dataset(tmp_path, adata), need_velocity=True)
    assert "3 cells have NaN/inf velocity" in caplog.text
    assert np.isfinite(dm.store.velocity).all() and (dm.store.confidence[[0, 3, 7]] == 0).all()
    assert (dm.store.velocity[[0, 3]] == 0).all() and dm.store.confidence[1] > 0


def test_cell_type_without_controls(tmp_path):
    skip = [("B", CONTROL, m) for m in ("m1", "m2")]
    with pytest.raises(DataError, match=r"no control cells for group\(s\) 'exp/B/p1/m1', 'exp/B/p1/m2'"):
        make_dm(single_dataset(tmp_path, make_adata(skip=skip)))


def test_missing_velocity_says_how_to_make_it(tmp_path):
    toml = single_dataset(tmp_path, make_adata(velocity=False))
    with pytest.raises(DataError, match=r"obsm 'velocity_X_state'.*stlib velocity .*exp\.h5ad --embed-key X_state"):
        make_dm(toml, need_velocity=True)
    make_dm(toml, need_velocity=False)  # fine without velocity


def test_embedding_from_x(tmp_path):
    dm = make_dm(single_dataset(tmp_path), embed_key="X")
    assert dm.input_dim == 5


def test_setup_is_idempotent_and_required(split_dm, tmp_path):
    store = split_dm.store
    split_dm.setup("fit")
    assert split_dm.store is store
    fresh = PerturbationDataModule(data_cfg(tmp_path / "x.toml"), S, B)
    with pytest.raises(RuntimeError, match=r"setup\(\) has not been called"):
        _ = fresh.input_dim


def test_make_sets_for_prediction(split_dm):
    g = split_dm.groups("test")[0]
    batch = split_dm.make_sets(g, 2, np.random.default_rng(0))
    assert batch["target"].shape == (2, S, 6)
    assert set(batch["group_index"].tolist()) == {g.gid}
