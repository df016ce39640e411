"""The command line: bad input ends in one line on stderr and exit code 2; the public API loads State runs."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from stlib_testing import REPO, STATE_FIXTURE

import stlib
from stlib.cli import main
from stlib.train_scripts import plan_scripts


def test_typo_is_one_line_and_exit_code_2(capsys):
    code = main(["train", "--config", str(REPO / "configs/variants/st_lora.yaml"), "training.max_step=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == "stlib train: error: unknown config key `training.max_step` — did you mean `training.max_steps`? " \
                     "(in command line)"


def test_missing_data_file_is_named(tmp_path, capsys):
    toml = tmp_path / "t.toml"
    toml.write_text('[datasets]\nwound = "missing.h5ad"\n[training]\nwound = "train"\n')
    code = main(["train", "--config", str(REPO / "configs/variants/st_lora.yaml"), f"data.toml_config_path={toml}",
                 "model.init_from=null"])
    err = capsys.readouterr().err
    assert code == 2 and "missing.h5ad" in err and "Traceback" not in err


def test_velocity_asks_which_cells_are_controls(tmp_path, capsys):
    code = main(["velocity", str(tmp_path / "any.h5ad"), "--embed-key", "X_state"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--pert-col and --control-pert" in err[0] and "--all-cells" in err[0]


@pytest.mark.slow  # a subprocess: python, torch and lightning start afresh
def test_debug_shows_the_traceback():
    done = subprocess.run([sys.executable, "-m", "stlib", "--debug", "train", "--config",
                           str(REPO / "configs/variants/st_lora.yaml"), "training.max_step=3"],
                          capture_output=True, text=True, check=False, cwd=REPO)
    assert done.returncode != 0 and "Traceback" in done.stderr and "ConfigError" in done.stderr


def test_every_command_has_help():
    for command in ("make-data", "pretrain", "train", "velocity", "predict", "evaluate", "scripts", "demo"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0


@pytest.mark.skipif(not STATE_FIXTURE.exists(), reason="../shared/fixtures not present")
def test_load_model_reproduces_states_forward_pass():
    ref = np.load(STATE_FIXTURE / "reference_forward.npz")
    model = stlib.load_model(STATE_FIXTURE)
    basal = torch.from_numpy(ref["ctrl_cell_emb"]).reshape(3, 16, -1)
    pert = torch.from_numpy(ref["pert_emb"]).reshape(3, 16, -1)
    out = model.predict_sets(basal, pert)
    np.testing.assert_allclose(out["pred"].reshape(48, -1).numpy(), ref["pred"], atol=1e-5)
    np.testing.assert_allclose(out["genes"].reshape(48, -1).numpy(), ref["pred_genes"], atol=1e-5)


def test_slurm_scripts_carry_sbatch_headers(tmp_path):
    (spec,) = plan_scripts(["st_lora"], out_dir=tmp_path, root=REPO, launcher="slurm")
    text = spec.path.read_text()
    assert spec.path.suffix == ".sbatch" and "#SBATCH --gres=gpu:1" in text and "#SBATCH --job-name=stlib_st_lora" in text
    assert "train --config configs/variants/st_lora.yaml" in text
