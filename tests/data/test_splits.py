"""State-style TOML splits: zeroshot/fewshot semantics, folders, and every bad-input message."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _data_fixtures import CONTROL, data_cfg, make_adata, single_dataset, write_h5ad, write_toml

from stlib.data.errors import DataError
from stlib.data.splits import assign_splits, load_split_config, split_masks

HEAD = '[datasets]\nexp = "exp.h5ad"\n[training]\nexp = "train"\n'
SPLIT_TEXT = """
[datasets]
exp = "exp.h5ad"
[training]
exp = "train"
[zeroshot]
"exp.B" = "test"
[fewshot."exp.C"]
val = ["p1"]
test = ["p2"]
"""


@pytest.fixture
def split_setup(tmp_path):
    adata = make_adata()
    write_h5ad(adata, tmp_path / "exp.h5ad")
    toml = write_toml(tmp_path, SPLIT_TEXT)
    return adata.obs, load_split_config(toml), data_cfg(toml)


def test_zeroshot_fewshot_semantics(split_setup):
    obs, split_cfg, cfg = split_setup
    labels = assign_splits(obs, split_cfg, cfg)
    ct, pert = obs["cell_types_simple_short"].to_numpy(), obs["condition"].to_numpy()
    assert set(labels[ct == "B"]) == {"test"}  # whole zeroshot cell type, controls included
    assert set(labels[ct == "A"]) == {"train"}  # unlisted cell type trains
    assert set(labels[(ct == "C") & (pert == "p1")]) == {"val"}
    assert set(labels[(ct == "C") & (pert == "p2")]) == {"test"}
    assert set(labels[(ct == "C") & (pert == CONTROL)]) == {"train"}  # fewshot controls stay in train
    train = labels == "train"
    assert not np.any(train & (ct == "B"))
    assert not np.any(train & (ct == "C") & np.isin(pert, ["p1", "p2"]))


def test_fewshot_val_and_test_may_overlap(tmp_path):
    write_h5ad(make_adata(), tmp_path / "exp.h5ad")
    toml = write_toml(tmp_path, '[datasets]\nexp = "exp.h5ad"\n[training]\nexp = "train"\n'
                                '[fewshot."exp.A"]\nval = ["p1"]\ntest = ["p1", "p2"]\n')
    obs = make_adata().obs
    masks = split_masks(obs, load_split_config(toml), data_cfg(toml))
    p1 = (obs["cell_types_simple_short"] == "A").to_numpy() & (obs["condition"] == "p1").to_numpy()
    assert masks["val"][p1].all() and masks["test"][p1].all() and not masks["train"][p1].any()
    assert set(assign_splits(obs, load_split_config(toml), data_cfg(toml))[p1]) == {"test"}


def test_dataset_outside_training_is_unused_unless_named(tmp_path):
    write_h5ad(make_adata(), tmp_path / "a.h5ad")
    write_h5ad(make_adata(), tmp_path / "b.h5ad")
    toml = write_toml(tmp_path, '[datasets]\na = "a.h5ad"\nb = "b.h5ad"\n[training]\na = "train"\n'
                                '[zeroshot]\n"b.A" = "val"\n')
    obs = make_adata().obs
    obs = pd.concat([obs.assign(dataset="a"), obs.assign(dataset="b")])
    labels = assign_splits(obs, load_split_config(toml), data_cfg(toml))
    in_b = (obs["dataset"] == "b").to_numpy()
    assert set(labels[~in_b]) == {"train"}
    assert set(labels[in_b & (obs["cell_types_simple_short"] == "A").to_numpy()]) == {"val"}
    assert set(labels[in_b & (obs["cell_types_simple_short"] != "A").to_numpy()]) == {"none"}


def test_folder_dataset_and_relative_paths(tmp_path):
    write_h5ad(make_adata(seed=1), tmp_path / "data" / "part1.h5ad")
    write_h5ad(make_adata(seed=2), tmp_path / "data" / "part2.h5ad")
    (tmp_path / "data" / "notes.txt").write_text("not a dataset")
    conf = tmp_path / "conf"
    conf.mkdir()
    split_cfg = load_split_config(write_toml(conf, '[datasets]\nexp = "../data"\n[training]\nexp = "train"\n'))
    assert split_cfg.datasets["exp"] == (tmp_path / "data").resolve()
    assert [p.name for p in split_cfg.files("exp")] == ["part1.h5ad", "part2.h5ad"]


def test_dotted_cell_type_names(tmp_path):
    adata = make_adata(cell_types=("T.cell", "B"))
    write_h5ad(adata, tmp_path / "exp.h5ad")
    toml = write_toml(tmp_path, HEAD + '[zeroshot]\n"exp.T.cell" = "val"\n')
    labels = assign_splits(adata.obs, load_split_config(toml), data_cfg(toml))
    assert set(labels[(adata.obs["cell_types_simple_short"] == "T.cell").to_numpy()]) == {"val"}


BAD_TOMLS = {
    "missing file": ('[datasets]\nexp = "nope.h5ad"\n[training]\nexp = "train"\n', r"nope\.h5ad does not exist"),
    "empty folder": ('[datasets]\nexp = "empty"\n[training]\nexp = "train"\n', r"holds no \.h5ad files"),
    "unknown training dataset": ('[datasets]\nexp = "exp.h5ad"\n[training]\nother = "train"\n',
                                 r"\[training\] names dataset 'other' not in \[datasets\].*'exp'"),
    "unknown zeroshot dataset": (HEAD + '[zeroshot]\n"x.A" = "test"\n',
                                 r"\[zeroshot\] key 'x\.A'.*datasets: 'exp'"),
    "bad zeroshot value": (HEAD + '[zeroshot]\n"exp.A" = "train"\n',
                           r'"exp\.A" = \'train\'.*expected "val" or "test"'),
    "bad training value": ('[datasets]\nexp = "exp.h5ad"\n[training]\nexp = "val"\n', r"expected \"train\""),
    "bad fewshot split": (HEAD + '[fewshot."exp.A"]\ntrain = ["p1"]\n',
                          r"has split\(s\) 'train'"),
    "fewshot not a list": (HEAD + '[fewshot."exp.A"]\nval = "p1"\n',
                           r"must be a list of perturbation names"),
    "both zeroshot and fewshot": (HEAD + '[zeroshot]\n"exp.A" = "val"\n[fewshot."exp.A"]\nval = ["p1"]\n',
                                  r"both \[zeroshot\] and \[fewshot\]"),
    "unknown section": ('[datasets]\nexp = "exp.h5ad"\n[trainig]\nexp = "train"\n', r"unknown section\(s\) 'trainig'"),
    "malformed": ('[datasets\nexp = "exp.h5ad"\n', r"malformed split TOML .*split\.toml"),
}


@pytest.mark.parametrize("case", list(BAD_TOMLS))
def test_bad_toml_errors(tmp_path, case):
    text, pattern = BAD_TOMLS[case]
    write_h5ad(make_adata(cells_per_combo=1), tmp_path / "exp.h5ad")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=pattern):
        load_split_config(write_toml(tmp_path, text))


def test_missing_toml(tmp_path):
    with pytest.raises(DataError, match="split TOML not found"):
        load_split_config(tmp_path / "absent.toml")


BAD_AGAINST_DATA = {
    "zeroshot cell type": ('[zeroshot]\n"exp.Z" = "test"\n', r"cell type 'Z' does not exist.*'A', 'B', 'C'"),
    "fewshot cell type": ('[fewshot."exp.Z"]\nval = ["p1"]\n', r"cell type 'Z' does not exist.*'A', 'B', 'C'"),
    "fewshot perturbation": ('[fewshot."exp.A"]\ntest = ["p9"]\n', r"perturbation\(s\) 'p9' not found.*'ctrl', 'p1'"),
    "fewshot control": ('[fewshot."exp.A"]\nval = ["ctrl"]\n', r"lists the control 'ctrl'"),
    "held-out batch": ('[heldout_batches]\n"exp.m9" = "test"\n', r"mouse_id = 'm9' does not exist.*'m1', 'm2'"),
}


@pytest.mark.parametrize("case", list(BAD_AGAINST_DATA))
def test_errors_against_the_data(tmp_path, case):
    text, pattern = BAD_AGAINST_DATA[case]
    adata = make_adata(cells_per_combo=1)
    write_h5ad(adata, tmp_path / "exp.h5ad")
    toml = write_toml(tmp_path, f'[datasets]\nexp = "exp.h5ad"\n[training]\nexp = "train"\n{text}')
    with pytest.raises(DataError, match=pattern):
        assign_splits(adata.obs, load_split_config(toml), data_cfg(toml))


def test_heldout_batches_hold_out_whole_mice(tmp_path):
    adata = make_adata(mice=(("m1", 10), ("m2", 10), ("m3", 14)))
    toml = single_dataset(tmp_path, adata, '[heldout_batches]\n"exp.m2" = "val"\n"exp.m3" = "test"\n')
    split_cfg = load_split_config(toml)
    labels = assign_splits(adata.obs, split_cfg, data_cfg(toml))
    mouse = adata.obs["mouse_id"].to_numpy()
    assert split_cfg.setting == "unseen_mouse"
    assert set(labels[mouse == "m1"]) == {"train"}  # every cell type trains on the other mice
    assert set(labels[mouse == "m2"]) == {"val"} and set(labels[mouse == "m3"]) == {"test"}


def test_heldout_batches_need_batch_col(tmp_path):
    toml = single_dataset(tmp_path, extra='[heldout_batches]\n"exp.m1" = "test"\n')
    with pytest.raises(DataError, match=r"data.batch_col, which is None"):
        assign_splits(make_adata().obs, load_split_config(toml), data_cfg(toml, batch_col=None))
    bad = write_toml(tmp_path, HEAD + '[heldout_batches]\n"exp.m1" = "train"\n')
    with pytest.raises(DataError, match=r'\[heldout_batches\] "exp.m1" = \'train\'.*"val" or "test"'):
        load_split_config(bad)


def test_missing_obs_column(split_setup):
    obs, split_cfg, cfg = split_setup
    with pytest.raises(DataError, match=r"obs column 'cell_types_simple_short' not found.*'condition'"):
        assign_splits(obs.drop(columns="cell_types_simple_short"), split_cfg, cfg)
