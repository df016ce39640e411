"""The user paths: generated bash scripts (run through tee), a failing variant (notebooks: test_notebooks.py)."""

import subprocess
from pathlib import Path

import pytest
from stlib_testing import REPO, TINY_TRAINING

from stlib.config import ConfigError
from stlib.train_scripts import parallel_commands, plan_scripts, run_scripts, status_table, tensorboard_command


def _overrides(study: Path, base: Path, steps: int = 4) -> list[str]:
    return [f"data.toml_config_path={study / 'data' / 'wound_healing.toml'}", f"model.init_from={base}",
            f"output_dir={study / 'wf_runs'}", f"training.max_steps={steps}", "model.cell_set_len=8",
            *TINY_TRAINING]


@pytest.fixture(scope="module")
def teed_st_lora(tiny_study, tiny_base, tmp_path_factory):
    """st_lora's script run as a user runs it, `bash script 2>&1 | tee log`, into a runs dir that holds a user's file.

    Both tests below read this one run: the second goes on to run the scripts through run_scripts beside it."""
    root = tmp_path_factory.mktemp("scripts")
    runs = tiny_study / "wf_runs"
    specs = plan_scripts(["baseline", "st_lora"], out_dir=root / "train_scripts", root=REPO,
                         overrides=_overrides(tiny_study, tiny_base), log_dir=root / "logs")
    (runs / "st_lora").mkdir(parents=True)
    (runs / "st_lora" / "notes.txt").write_text("keep me")
    log = root / "logs" / "st_lora_training.log"
    log.parent.mkdir()
    done = subprocess.run(["bash", "-c", f"set -o pipefail; bash {specs[1].path} 2>&1 | tee {log}"], cwd=root,
                          capture_output=True, text=True, timeout=300, check=False)
    return {"specs": specs, "runs": runs, "root": root, "log": log, "done": done}


@pytest.mark.slow
@pytest.mark.xdist_group("teed_st_lora")  # with -n: one worker, one scripted run for both tests
def test_scripts_are_exact_commands_runnable_with_tee(teed_st_lora, tiny_study):
    specs, done, log = teed_st_lora["specs"], teed_st_lora["done"], teed_st_lora["log"]
    text = specs[1].path.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert "train --config configs/variants/st_lora.yaml" in text and "training.max_steps=4" in text
    assert "training.max_steps" not in specs[0].path.read_text()  # the baseline is never trained
    assert done.returncode == 0, done.stdout[-2000:]
    assert "[stlib] done: 4 steps" in log.read_text()
    assert (specs[1].run_dir / "checkpoints" / "final.ckpt").exists()
    assert parallel_commands(specs, gpus=[0, 1])[1].startswith("CUDA_VISIBLE_DEVICES=1 bash ")
    assert tensorboard_command(specs) == f"tensorboard --logdir {tiny_study / 'wf_runs'}"


def test_a_bad_override_fails_before_any_script_is_written(tmp_path):
    with pytest.raises(ConfigError, match="did you mean `training.max_steps`"):
        plan_scripts(["st_lora"], out_dir=tmp_path, root=REPO, overrides=["training.max_step=3"])
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.xdist_group("teed_st_lora")
def test_a_failing_variant_is_reported_and_the_others_still_run(teed_st_lora, tiny_study, tiny_base):
    """After st_lora's run above: a failing variant first, then the baseline still runs and st_lora is skipped."""
    good, runs, root = teed_st_lora["specs"], teed_st_lora["runs"], teed_st_lora["root"]
    assert teed_st_lora["done"].returncode == 0
    assert (runs / "st_lora" / "notes.txt").read_text() == "keep me"  # training beside a user's file leaves it
    bad = plan_scripts(["st_lora_mhc"], out_dir=root / "train_scripts", root=REPO, log_dir=root / "logs",
                       overrides=_overrides(tiny_study, tiny_base) + ["data.pert_col=treatment"])
    with open(root / "out.txt", "w") as out:
        status = run_scripts([bad[0], *good], root=REPO, stream=out)
    by_variant = status.set_index("variant")
    assert by_variant.loc["st_lora_mhc", "status"] == "failed"
    assert "data.pert_col" in by_variant.loc["st_lora_mhc", "error"]
    assert by_variant.loc["baseline", "status"] == "completed"  # ran after the failure
    assert by_variant.loc["st_lora", "status"] == "skipped (done)"  # finished variants are not retrained
    # run again: finished variants are skipped, nothing retrained
    with open(root / "out2.txt", "w") as out:
        again = run_scripts(good, root=REPO, stream=out)
    assert set(again.status) == {"skipped (done)"}
    assert set(status_table(good, root=REPO).status) == {"completed"}
    # overwrite moves the old run aside instead of deleting it, and trains afresh
    with open(root / "out3.txt", "w") as out:
        retrained = run_scripts(good[1:], root=REPO, overwrite=True, stream=out)
    assert list(retrained.status) == ["completed"]
    assert (runs / "st_lora" / "checkpoints" / "final.ckpt").exists()
    moved = [p for p in runs.iterdir() if p.name.startswith("st_lora.old-")]
    assert moved and (moved[0] / "notes.txt").read_text() == "keep me"
