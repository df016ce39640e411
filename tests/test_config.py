"""Config: every shipped YAML loads, overrides apply and round-trip, typos and bad values fail clearly."""

from pathlib import Path

import pytest

from stlib.config import Config, ConfigError, config_to_dict, load_config, save_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
from stlib.constants import VARIANTS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_grid(variant):
    cfg = load_config(REPO / "configs" / "variants" / f"{variant}.yaml")
    assert cfg.name == variant
    assert cfg.lora.enable == (variant != "baseline")
    assert cfg.mhc.enable == ("mhc" in variant)
    assert cfg.velocity.alignment == ("velocity" in variant)
    assert (cfg.training.max_steps == 0) == (variant == "baseline")
    # inherited from configs/finetune.yaml: the study plan's keys
    assert (cfg.data.pert_col, cfg.data.control_pert, cfg.data.batch_col) == ("condition", "Sham", "mouse_id")


def test_study_plan_overrides_apply():
    cfg = load_config(REPO / "configs/variants/st_lora.yaml",
                      ["training.max_steps=400", "model.hidden_dim=256", "model.lora.r=8", "model.mhc.sinkhorn_iters=10",
                       "data.batch_col=null", "training.devices=[0,1]", "name=x"])
    assert cfg.training.max_steps == 400 and cfg.model.hidden_dim == 256 and cfg.lora.r == 8
    assert cfg.mhc.sinkhorn_iters == 10 and cfg.data.batch_col is None
    assert cfg.training.devices == [0, 1] and cfg.name == "x"


def test_state_kwargs_spelling_is_an_alias():
    cfg = load_config(None, ["data.kwargs.embed_key=X_emb", "model.kwargs.hidden_dim=64"])
    assert cfg.data.embed_key == "X_emb" and cfg.model.hidden_dim == 64


@pytest.mark.parametrize("override, match", [
    ("training.max_step=3", r"training\.max_step.*did you mean `training\.max_steps`"),
    ("model.lora.rank=4", r"unknown config key `model\.lora\.rank`"),
    ("modle.hidden_dim=3", r"did you mean `model\.hidden_dim`"),
])
def test_unknown_key_fails_with_suggestion(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize("override, match", [
    ("training.max_steps=abc", r"training\.max_steps"),
    ("model.loss=wasserstein", r"loss\.name='wasserstein' is not one of energy, sinkhorn, mse"),
    ("data.output_space=genes", r"data\.output_space"),
    ("model.hidden_dim=100", r"not divisible by model\.n_heads=8"),
    ("model.lora.r=0", r"lora\.r must be >= 1"),
    ("training.max_steps", r"must look like key=value"),
])
def test_bad_values_fail_clearly(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_missing_file_and_bad_key_in_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  lr_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"training\.lr_rate.*bad\.yaml"):
        load_config(bad)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs/variants/st_lora_mhc_velocity.yaml", ["training.max_steps=7"])
    save_config(cfg, tmp_path / "config.yaml", ["training.max_steps=7"])
    assert "# overrides: training.max_steps=7" in (tmp_path / "config.yaml").read_text()
    assert config_to_dict(load_config(tmp_path / "config.yaml")) == config_to_dict(cfg)


def test_a_config_in_the_layout_before_the_groups_still_loads():
    """Run dirs saved before the config groups wrote losses, decoder, velocity, LoRA and mHC under `model`."""
    from stlib.config import config_from_dict

    old = {"model": {"hidden_dim": 64, "loss": "sinkhorn", "blur": 0.1, "decoder_hidden": [32], "decoder_skip": False,
                     "use_mhc": True, "mhc": {"n_streams": 2}, "lora": {"enable": True, "r": 4},
                     "use_velocity_alignment": True, "velocity_lambda": 0.01, "velocity_displacement": True},
           "data": {"kwargs": {"embed_key": "X_emb"}}}
    cfg = config_from_dict(old)
    assert cfg.model.hidden_dim == 64 and cfg.data.embed_key == "X_emb"
    assert (cfg.loss.name, cfg.loss.blur) == ("sinkhorn", 0.1)
    assert cfg.decoder.hidden == [32] and not cfg.decoder.skip
    assert cfg.mhc.enable and cfg.mhc.n_streams == 2 and cfg.lora.enable and cfg.lora.r == 4
    assert cfg.velocity.alignment and cfg.velocity.loss_weight == 0.01 and cfg.velocity.displacement


def test_required_data_keys_are_named_before_any_data_is_read(tmp_path):
    from stlib.config import Config

    cfg = Config()
    with pytest.raises(ConfigError, match=r"data\.toml_config_path, data\.embed_key, data\.pert_col"):
        cfg.data.check_required()
