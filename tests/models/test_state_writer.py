"""Our writer of State's run-dir layout: what it writes, load_state_run reads back to the same model."""

from __future__ import annotations

import pytest
import torch

from stlib.config import Config, DecoderConfig, ModelConfig
from stlib.errors import ConfigError
from stlib.models.state_checkpoint import is_state_run_dir, load_state_run, write_state_run
from stlib.models.state_transition import StateTransitionModel

DATA = {"embed_key": "X_hvg", "output_space": "gene", "pert_col": "condition", "control_pert": "Sham",
        "cell_type_key": "cell_type", "batch_col": "mouse_id"}


def _model(**over):
    cfg = Config(model=ModelConfig(hidden_dim=32, n_layers=2, n_heads=4, head_dim=8, intermediate_size=64,
                                   n_encoder_layers=2, n_decoder_layers=2, residual_space="hidden", output_relu=True,
                                   cell_set_len=16, **over),
                 decoder=DecoderConfig(hidden=[48, 40], softplus=False, skip=False, dropout=0.0))
    torch.manual_seed(0)
    model = StateTransitionModel(cfg.model, input_dim=20, pert_dim=3, gene_dim=20, decoder=cfg.decoder).eval()
    return model, cfg


def test_a_written_run_dir_loads_back_to_the_same_forward_pass(tmp_path):
    model, cfg = _model()
    write_state_run(tmp_path / "run", model, cfg, DATA, ["Sham", "Burn", "Scald"], [f"g{i}" for i in range(20)])
    assert is_state_run_dir(tmp_path / "run")
    run = load_state_run(tmp_path / "run")
    assert run.pert_map == {"Sham": 0, "Burn": 1, "Scald": 2} and run.gene_names[:2] == ["g0", "g1"]
    assert run.model.cfg.output_relu and run.model.cfg.cell_set_len == 16 and run.data_overrides["embed_key"] == "X_hvg"
    basal = torch.rand(2, 16, 20)
    pert = torch.nn.functional.one_hot(torch.tensor([1, 2]), 3).float()[:, None].expand(2, 16, 3)
    with torch.no_grad():
        want, got = model(basal, pert), run.model(basal, pert)
    torch.testing.assert_close(got["pred"], want["pred"])
    torch.testing.assert_close(got["genes"], want["genes"])


def test_a_model_state_would_not_build_is_refused(tmp_path):
    model, cfg = _model()
    cfg.model.output_relu = False  # State clamps on X_hvg
    with pytest.raises(ConfigError, match="output_relu=False with embed_key='X_hvg'"):
        write_state_run(tmp_path / "run", model, cfg, DATA, ["Sham", "Burn", "Scald"])
