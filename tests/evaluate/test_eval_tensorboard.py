"""TensorBoard round trip: write with torch's SummaryWriter, read back, resolve a resumed run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from stlib.evaluate.layout import EvalError
from stlib.evaluate.tensorboard import grad_spikes, read_scalars, read_text, training_dynamics


def _write(folder, start, stop, t0, loss_offset=0.0, grad_spike_at=None):
    w = SummaryWriter(str(folder))
    for step in range(start, stop):
        wall = t0 + 0.5 * step  # 0.5 s per step
        w.add_scalar("train/loss", 10.0 / (step + 1) + loss_offset, step, walltime=wall)
        w.add_scalar("train/grad_norm", 50.0 if step == grad_spike_at else 1.0 + 0.01 * (step % 3), step, walltime=wall)
        w.add_scalar("perf/cells_per_sec", 1000.0, step, walltime=wall)
        if step % 10 == 0:
            w.add_scalar("val/loss", 5.0 / (step + 1) + loss_offset, step, walltime=wall)
    w.add_text("trainable_params", f"trainable {start}", start, walltime=t0 + 0.5 * start)
    w.close()


@pytest.fixture
def resumed_run(tmp_path):
    """Steps 0-59 in version_0, then a resume from step 40 (values +1) in version_1, written later."""
    run = tmp_path / "run"
    _write(run / "tensorboard" / "version_0", 0, 60, t0=1000.0, grad_spike_at=30)
    _write(run / "tensorboard" / "version_1", 40, 80, t0=5000.0, loss_offset=1.0)
    (run / "trainable_params.json").write_text(json.dumps({"trainable": 17, "total": 1000, "fraction": 0.017}))
    return run


def test_read_scalars_round_trip_keeps_newest_value_per_step(resumed_run):
    df = read_scalars(resumed_run)
    assert list(df.columns) == ["step", "tag", "value", "wall_time"]
    loss = df[df["tag"] == "train/loss"].set_index("step")["value"]
    assert list(loss.index) == list(range(80))  # one row per step despite the overlap
    assert loss[10] == pytest.approx(10.0 / 11)  # only in the first run
    assert loss[50] == pytest.approx(10.0 / 51 + 1.0)  # overlap: the resumed (newer) value wins
    assert set(df["tag"]) == {"train/loss", "train/grad_norm", "perf/cells_per_sec", "val/loss"}


def test_read_text_and_missing_tags(resumed_run, tmp_path):
    text = read_text(resumed_run, "trainable_params")
    assert list(text["text"]) == ["trainable 0", "trainable 40"]
    with pytest.raises(EvalError, match="trainable_params"):
        read_text(resumed_run, "nope")
    with pytest.raises(EvalError, match="does not exist"):
        read_scalars(tmp_path / "missing")


def test_grad_spikes_flags_outliers_only():
    rng = np.random.default_rng(0)
    values = 1.0 + 0.05 * rng.standard_normal(200)
    values[[20, 60, 150]] = [4.0, 5.0, 3.0]
    assert list(np.flatnonzero(grad_spikes(values))) == [20, 60, 150]
    assert not grad_spikes(np.ones(100)).any()  # flat history: no spikes from MAD = 0
    assert not grad_spikes(np.r_[np.ones(5), 100.0]).any()  # too little history to judge


def test_training_dynamics_summarises_each_run(resumed_run, tmp_path):
    plain = tmp_path / "plain"
    _write(plain, 0, 30, t0=0.0)
    df = training_dynamics({"resumed": resumed_run, "plain": plain}).set_index("model")
    r = df.loc["resumed"]
    assert r["steps"] == 79
    assert r["final_train_loss"] == pytest.approx(10.0 / 80 + 1.0)
    assert r["best_val_loss"] == pytest.approx(5.0 / 31)  # step 30, before the resume's offset
    assert r["best_val_step"] == 30
    assert r["grad_norm_spikes"] == 1
    assert r["sec_per_step"] == pytest.approx(0.5, rel=1e-3)
    assert r["cells_per_sec"] == pytest.approx(1000.0)
    assert r["trainable_pct"] == pytest.approx(1.7)
    assert np.isnan(df.loc["plain", "trainable_pct"])  # no trainable_params.json
    assert df.loc["plain", "grad_norm_spikes"] == 0
