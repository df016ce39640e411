"""Data-parallel training through Lightning: each process trains on its own share of every batch, and two
processes with half the batch each end where one process with the whole batch ends."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from stlib_testing import REPO, tiny_overrides

from stlib.config import load_config
from stlib.data.datamodule import PerturbationDataModule
from stlib.models.checkpoints import load_lightning_state_dict


def _batches(cfg, batch_size, rank=0, world=1, n=3):
    dm = PerturbationDataModule(cfg.data, cfg.model.cell_set_len, batch_size, seed=cfg.training.seed)
    dm.setup()
    dm.train_batches = n
    if world > 1:
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
    return list(dm.train_dataloader())


def test_each_process_draws_its_own_share_of_the_global_batch(tiny_study):
    overrides = tiny_overrides(tiny_study, "shares", "source_perturbations.toml", 3)
    cfg = load_config(REPO / "configs" / "pretrain.yaml", overrides)
    whole = _batches(cfg, 4)
    ranks = [_batches(cfg, 2, rank, 2) for rank in (0, 1)]
    for k, batch in enumerate(whole):
        a, b = ranks[0][k], ranks[1][k]
        assert not torch.equal(a["basal"], b["basal"])  # different cell sets on the two processes
        for key in ("basal", "target", "pert"):
            torch.testing.assert_close(torch.cat([a[key], b[key]]), batch[key])  # together: the one-process batch


def _train_cli(tiny_study, name, extra):
    overrides = tiny_overrides(tiny_study, name, "source_perturbations.toml", 4) + extra
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "stlib", "pretrain", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tiny_study / "runs" / name, done.stdout


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tiny_study):
    one, _ = _train_cli(tiny_study, "one_process", ["training.batch_size=4", "training.devices=1",
                                                    "training.accelerator=cpu"])
    two, stdout = _train_cli(tiny_study, "two_processes", ["training.batch_size=2", "training.devices=2",
                                                           "training.strategy=ddp", "training.accelerator=cpu"])
    assert stdout.count("[stlib] run dir:") == 1  # only the main process talks
    metrics = [json.loads((run / "run_summary.json").read_text())["metrics"] for run in (one, two)]
    # the global gradient (its norm, before clipping) and the validation loss agree to float32 rounding
    for key in ("train/grad_norm", "val/loss"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-5), key
    a = load_lightning_state_dict(one / "checkpoints" / "final.ckpt")
    b = load_lightning_state_dict(two / "checkpoints" / "final.ckpt")
    for key in a:  # Adam's first steps move weights by ~lr whatever the gradient's size, so rounding shows here
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4, msg=key)


def test_the_slurm_script_asks_for_one_task_per_gpu_on_every_node(tmp_path):
    from stlib.train_scripts import plan_scripts

    (spec,) = plan_scripts(["st_lora"], out_dir=tmp_path / "scripts", log_dir=tmp_path / "logs", launcher="slurm",
                           root=REPO, overrides=["training.devices=4", "training.strategy=ddp",
                                                 "training.num_nodes=2"])
    text = (REPO / spec.path).read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gres=gpu:4"):
        assert line in text
    assert 'srun "$STLIB" train' in text
    (one,) = plan_scripts(["st_lora"], out_dir=tmp_path / "one", log_dir=tmp_path / "logs", launcher="slurm",
                          root=REPO)
    assert "srun" not in (REPO / one.path).read_text() and "--ntasks-per-node=1" in (REPO / one.path).read_text()
