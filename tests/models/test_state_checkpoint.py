"""A real `state tx train` run dir loads strictly and reproduces State's own forward pass."""

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from stlib_testing import STATE_FIXTURE

from stlib.models.state_checkpoint import (
    StateCheckpointError,
    is_state_run_dir,
    load_state_run,
    read_var_dims,
)

FIXTURE = STATE_FIXTURE
pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="State fixture not available")
RUN_FILES = ("config.yaml", "var_dims.pkl", "pert_onehot_map.pt", "cell_type_onehot_map.torch",
             "batch_onehot_map.torch")


@pytest.fixture(scope="module")
def run():
    return load_state_run(FIXTURE)


@pytest.fixture(scope="module")
def ckpt():
    full = torch.load(FIXTURE / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
    return {"state_dict": full["state_dict"], "hyper_parameters": full["hyper_parameters"]}


def make_run_dir(tmp_path: Path, ckpt: dict, config: dict | None = None) -> Path:
    """A copy of the fixture run with our (possibly damaged) checkpoint and config."""
    (tmp_path / "checkpoints").mkdir()
    for f in RUN_FILES:
        shutil.copy(FIXTURE / f, tmp_path / f)
    if config is not None:
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    torch.save(ckpt, tmp_path / "checkpoints" / "final.ckpt")
    return tmp_path


def test_reproduces_state_reference_forward(run):
    ref = np.load(FIXTURE / "reference_forward.npz")
    basal = torch.from_numpy(ref["ctrl_cell_emb"]).view(3, 16, 16)
    pert = torch.from_numpy(ref["pert_emb"]).view(3, 16, 2)
    out = run.model.predict_sets(basal, pert)
    np.testing.assert_allclose(out["pred"].reshape(48, 16).numpy(), ref["pred"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["genes"].reshape(48, 50).numpy(), ref["pred_genes"], atol=1e-5, rtol=0)
    assert not run.model.training


def test_run_metadata(run):
    assert run.pert_map == {"Burn": 0, "Sham": 1}
    assert run.batch_map == {"M1": 0, "M2": 1, "M3": 2, "M4": 3}
    assert len(run.cell_type_map) == 6
    assert run.data_overrides == {"embed_key": "X_emb", "pert_col": "condition", "control_pert": "Sham",
                                  "cell_type_key": "cell_type", "batch_col": "mouse_id", "output_space": "gene"}
    assert run.var_dims["input_dim"] == 16 and run.var_dims["pert_names"] == ["Burn", "Sham"]
    assert run.gene_names[:2] == ["Gene000", "Gene001"] and len(run.gene_names) == 50
    cfg, decoder = run.config.model, run.config.decoder
    assert (cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim) == (32, 2, 4, 4, 8)
    assert (cfg.intermediate_size, cfg.cell_set_len, decoder.hidden) == (64, 16, [1024, 1024, 512])
    assert cfg.predict_residual and not cfg.output_relu and not decoder.softplus
    assert run.checkpoint_path.name == "final.ckpt"


def test_reference_one_hots_follow_the_pert_map(run):
    ref = np.load(FIXTURE / "reference_forward.npz")
    idx = [run.pert_map[str(name)] for name in ref["pert_names"]]
    np.testing.assert_array_equal(ref["pert_emb"].argmax(1), idx)


def test_path_forms(tmp_path, ckpt):
    assert is_state_run_dir(FIXTURE) and not is_state_run_dir(tmp_path)
    direct = load_state_run(FIXTURE / "checkpoints" / "final.ckpt")
    assert direct.pert_map == {"Burn": 0, "Sham": 1}
    with pytest.raises(StateCheckpointError, match=r"best\.ckpt.*final\.ckpt"):
        load_state_run(FIXTURE, checkpoint="best.ckpt")
    run_dir = make_run_dir(tmp_path, ckpt)
    (run_dir / "checkpoints" / "final.ckpt").rename(run_dir / "checkpoints" / "step=40.ckpt")
    assert load_state_run(run_dir).checkpoint_path.name == "step=40.ckpt"  # newest when no final/last


def test_missing_key_is_named(tmp_path, ckpt):
    damaged = dict(ckpt, state_dict={k: v for k, v in ckpt["state_dict"].items() if k != "project_out.0.bias"})
    with pytest.raises(StateCheckpointError, match=r"missing keys.*project_out\.0\.bias"):
        load_state_run(make_run_dir(tmp_path, damaged))


def test_renamed_key_is_named(tmp_path, ckpt):
    sd = dict(ckpt["state_dict"])
    sd["transformer_backbone.layers.0.attn.q_proj.weight"] = sd.pop("transformer_backbone.layers.0.self_attn.q_proj.weight")
    with pytest.raises(StateCheckpointError) as err:
        load_state_run(make_run_dir(tmp_path, dict(ckpt, state_dict=sd)))
    msg = str(err.value)
    assert "layers.0.self_attn.q_proj.weight" in msg and "unexpected keys" in msg and "layers.0.attn.q_proj" in msg


def test_config_that_disagrees_with_weights(tmp_path, ckpt):
    config = yaml.safe_load((FIXTURE / "config.yaml").read_text())
    config["model"]["kwargs"]["transformer_backbone_kwargs"]["intermediate_size"] = 48
    with pytest.raises(StateCheckpointError, match=r"shape mismatches.*gate_proj"):
        load_state_run(make_run_dir(tmp_path, ckpt, config))


@pytest.mark.parametrize("key, value, needle", [
    ("transformer_backbone_key", "GPT2", "transformer_backbone_key='GPT2'"),
    ("use_batch_token", True, "use_batch_token=True"),
    ("residual_decoder", True, "residual_decoder=True"),
])
def test_unsupported_state_options_are_named(tmp_path, ckpt, key, value, needle):
    config = yaml.safe_load((FIXTURE / "config.yaml").read_text())
    config["model"]["kwargs"][key] = value
    with pytest.raises(StateCheckpointError, match=needle):
        load_state_run(make_run_dir(tmp_path, ckpt, config))


def test_var_dims_refuses_arbitrary_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    path = tmp_path / "var_dims.pkl"
    path.write_bytes(pickle.dumps({"input_dim": 3, "x": Evil()}))
    with pytest.raises(StateCheckpointError, match="shutil.rmtree"):
        read_var_dims(path)
    assert (tmp_path / "victim").is_dir()


def test_state_defaults_apply_when_keys_are_absent():
    from stlib.models.state_checkpoint import model_config_from_state

    kw = {"hidden_dim": 32, "transformer_backbone_kwargs": {"hidden_size": 32, "num_attention_heads": 4}}
    cfg = model_config_from_state(kw, gene_decoder=None, embed_key="X_emb").model
    assert (cfg.n_encoder_layers, cfg.n_decoder_layers, cfg.dropout) == (2, 2, 0.1)  # State's code defaults
    assert cfg.output_relu  # State clamps at 0 when there is no gene decoder
    with pytest.raises(StateCheckpointError, match="hidden_size=64"):
        model_config_from_state({"hidden_dim": 32, "transformer_backbone_kwargs": {"hidden_size": 64}}, None, None)
