"""A fine-tune reads the input its base read, or says so; shape settings inherit; causal State runs are refused."""

import shutil

import anndata as ad
import pytest
import yaml
from stlib_testing import REPO, STATE_FIXTURE, TINY_MODEL, tiny_overrides

from stlib.config import load_config
from stlib.data.io import write_h5ad
from stlib.errors import ConfigError
from stlib.models.state_checkpoint import StateCheckpointError, load_state_run
from stlib.train.run import prepare_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def other_input_study(tiny_study, tmp_path_factory):
    """The tiny wound data with its embedding also under obsm['X_other']."""
    root = tmp_path_factory.mktemp("other_input")
    shutil.copytree(tiny_study / "data", root / "data")
    path = root / "data" / "wound_healing.h5ad"
    adata = ad.read_h5ad(path)
    adata.obsm["X_other"] = adata.obsm["X_state"].copy()
    write_h5ad(adata, path)
    return root


def _cfg(study, base, *extra, drop_set_len=False):
    overrides = tiny_overrides(study, "guard", "wound_healing.toml", 2) + [f"model.init_from={base}", *extra]
    if drop_set_len:
        overrides = [o for o in overrides if not o.startswith("model.cell_set_len=")]
    return load_config(REPO / "configs" / "variants" / "st_lora.yaml", overrides)


def test_another_input_than_the_base_read_stops_with_both_named(other_input_study, tiny_base):
    with pytest.raises(ConfigError, match=r"read obsm\['X_state'\] \(16-d embedding\).*'X_other'.*allow_other_input"):
        prepare_run(_cfg(other_input_study, tiny_base, "data.embed_key=X_other"))


def test_the_override_trains_and_takes_the_output_clamp_from_the_config(other_input_study, tiny_base):
    prep = prepare_run(_cfg(other_input_study, tiny_base, "data.embed_key=X_other", "model.allow_other_input=true",
                            "model.output_relu=false"))
    assert prep.cfg.data.embed_key == "X_other" and not prep.cfg.model.output_relu


def test_cell_set_len_comes_from_the_base_unless_given(tiny_study, tiny_base):
    base_len = load_config(tiny_base / "config.yaml").model.cell_set_len
    assert base_len == int(next(o for o in TINY_MODEL if o.startswith("model.cell_set_len=")).split("=")[1])
    inherited = prepare_run(_cfg(tiny_study, tiny_base, drop_set_len=True)).cfg.model.cell_set_len
    given = prepare_run(_cfg(tiny_study, tiny_base, "model.cell_set_len=6")).cfg.model.cell_set_len
    assert (inherited, given) == (base_len, 6)


@pytest.mark.skipif(not STATE_FIXTURE.exists(), reason="../shared/fixtures not present")
def test_a_state_run_with_causal_attention_is_refused(tmp_path):
    run_dir = tmp_path / "causal"
    shutil.copytree(STATE_FIXTURE, run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"]["kwargs"]["transformer_backbone_kwargs"]["bidirectional_attention"] = False
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(StateCheckpointError, match="bidirectional_attention=False is not supported"):
        load_state_run(run_dir)


@pytest.mark.skipif(not STATE_FIXTURE.exists(), reason="../shared/fixtures not present")
def test_a_gene_matrix_wider_than_the_base_decoder_stops_before_training(tmp_path):
    """State's var_dims can name all genes while its decoder predicts fewer (hvg_dim): the widths are compared."""
    import numpy as np
    import scipy.sparse as sp

    shutil.copy(STATE_FIXTURE / "task.toml", tmp_path / "task.toml")
    (tmp_path / "data").mkdir()
    adata = ad.read_h5ad(STATE_FIXTURE / "data" / "wound.h5ad")
    extra = ad.AnnData(X=sp.csr_matrix(np.ones((adata.n_obs, 10), np.float32)), obs=adata.obs[[]])
    extra.var_names = [f"extra_{i}" for i in range(10)]
    wider = ad.concat([adata, extra], axis=1, merge="first")
    wider.obs, wider.obsm = adata.obs, adata.obsm
    write_h5ad(wider, tmp_path / "data" / "wound.h5ad")
    overrides = [f"model.init_from={STATE_FIXTURE}", f"data.toml_config_path={tmp_path / 'task.toml'}",
                 "data.embed_key=X_emb", "data.cell_type_key=cell_type", "data.output_space=gene", "data.gene_layer=null",
                 "model.cell_set_len=16", f"output_dir={tmp_path / 'runs'}", "name=wider", "training.max_steps=2"]
    with pytest.raises(ConfigError, match=r"gene decoder predicts 50 genes but the data's gene matrix \(data.gene_layer: "
                                          r"X\) has 60.*output_space=embedding"):
        prepare_run(load_config(REPO / "configs" / "variants" / "st_lora.yaml", overrides))
    assert not (tmp_path / "runs" / "wider" / "checkpoints").exists()
