"""A finished run whose data or base changed after it trained is not skipped as done: it is retrained."""

import io
import json
import os
import time

from stlib.config import load_config, save_config
from stlib.data.synthetic import write_state_toml
from stlib.train.freshness import newer_inputs
from stlib.train_scripts import ScriptSpec, run_scripts


def _finished_run(root, with_base=True):
    (root / "data").mkdir(parents=True, exist_ok=True)
    data = root / "data" / "study.h5ad"
    data.write_bytes(b"stand-in")  # only its time stamp is read
    write_state_toml(root / "data" / "study.toml", datasets={"study": "study.h5ad"}, training={"study": "train"})
    base_ckpt = root / "base" / "checkpoints" / "final.ckpt"
    base_ckpt.parent.mkdir(parents=True, exist_ok=True)
    base_ckpt.write_bytes(b"base")
    run_dir = root / "runs" / "st_lora"
    (run_dir / "checkpoints").mkdir(parents=True)
    init_from = [] if with_base else ["model.init_from=base"]  # a full fine-tune: no base.json, the config names it
    cfg = load_config(None, ["data.toml_config_path=data/study.toml", *init_from])
    save_config(cfg, run_dir / "config.yaml")
    if with_base:
        (run_dir / "base.json").write_text(json.dumps({"checkpoint": str(base_ckpt)}))
    past = time.time() - 100
    for path in (data, base_ckpt):
        os.utime(path, (past, past))
    (run_dir / "checkpoints" / "final.ckpt").write_bytes(b"trained")
    return run_dir, data, base_ckpt


def _touch(path):
    later = time.time() + 10
    os.utime(path, (later, later))


def test_an_up_to_date_run_has_no_newer_inputs(tmp_path):
    run_dir, _, _ = _finished_run(tmp_path)
    assert newer_inputs(run_dir, tmp_path) == []


def test_remade_data_or_a_retrained_base_makes_the_run_stale(tmp_path):
    run_dir, data, base_ckpt = _finished_run(tmp_path)
    _touch(data)
    assert newer_inputs(run_dir, tmp_path) == [data.resolve()]
    _touch(base_ckpt)
    assert set(newer_inputs(run_dir, tmp_path)) == {data.resolve(), base_ckpt}


def test_a_full_fine_tune_is_stale_when_the_base_it_started_from_retrained(tmp_path):
    run_dir, _, base_ckpt = _finished_run(tmp_path, with_base=False)
    assert newer_inputs(run_dir, tmp_path) == []
    _touch(base_ckpt)
    assert newer_inputs(run_dir, tmp_path) == [tmp_path / "base" / "checkpoints" / "final.ckpt"]


def test_run_scripts_retrains_a_stale_run_and_keeps_the_old_one(tmp_path):
    run_dir, data, _ = _finished_run(tmp_path)
    script = tmp_path / "train_st_lora.sh"
    script.write_text("mkdir -p runs/st_lora/checkpoints && echo fresh > runs/st_lora/checkpoints/final.ckpt\n")
    spec = ScriptSpec("st_lora", script, tmp_path / "cfg.yaml", [], run_dir.relative_to(tmp_path),
                      (tmp_path / "logs" / "st_lora.log").relative_to(tmp_path))
    (tmp_path / "logs").mkdir()
    said = io.StringIO()
    run_scripts([spec], root=tmp_path, stream=said)
    assert "skipped" in said.getvalue() and (run_dir / "checkpoints" / "final.ckpt").read_bytes() == b"trained"
    _touch(data)
    said = io.StringIO()
    run_scripts([spec], root=tmp_path, stream=said)
    assert f"{data.resolve()} changed after it trained: retraining" in said.getvalue()
    assert (run_dir / "checkpoints" / "final.ckpt").read_text().strip() == "fresh"
    old = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("st_lora.old-")]
    assert len(old) == 1 and (old[0] / "checkpoints" / "final.ckpt").read_bytes() == b"trained"
