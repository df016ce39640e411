"""LoRA fine-tunes save what trains and name their base; resume is exact; retention; the base is checked."""

import json
import shutil

import lightning as L
import pytest
import torch
from stlib_testing import REPO, tiny_overrides

from stlib.adapters.lora import trained_keys
from stlib.config import load_config
from stlib.errors import ModelLoadError
from stlib.loading import export_merged, load_any
from stlib.models.checkpoints import load_lightning_state_dict, read_checkpoint
from stlib.train.run import train

pytestmark = pytest.mark.slow


def _finetune(tiny_study, base, name, steps=8, variant="st_lora", extra=()):
    overrides = tiny_overrides(tiny_study, name, "wound_healing.toml", steps) + [
        f"model.init_from={base}", "data.output_space=all", "training.ckpt_every_n_steps=0.25",
        "training.val_every_n_steps=0.25", "training.average_weights_from=0.5", *extra]
    return load_config(REPO / "configs" / "variants" / f"{variant}.yaml", overrides), overrides


@pytest.fixture(scope="module")
def lean_run(tiny_study, tiny_base):
    cfg, overrides = _finetune(tiny_study, tiny_base, "lean")
    return train(cfg, overrides)


def test_checkpoints_hold_what_trains_and_no_frozen_base_weight(lean_run):
    loaded = load_any(lean_run)
    trained = {f"model.{k}" for k in trained_keys(loaded.model)}
    frozen = {f"model.{k}" for k in loaded.model.state_dict()} - trained
    assert any("base_layer" in k for k in frozen)  # the frozen base is there to leave out
    ckpts = sorted((lean_run / "checkpoints").glob("*.ckpt"))
    for path in ckpts:
        state = read_checkpoint(path)["state_dict"]
        assert set(state) == trained, path.name
    base = json.loads((lean_run / "base.json").read_text())
    assert base["sha256"] and base["checkpoint"].endswith(".ckpt")


def test_only_the_newest_step_checkpoints_are_kept(lean_run):
    # every 0.25 of 8 steps = steps 2, 4, 6, 8; keep_checkpoints=2 keeps 6 and 8, beside last and final
    names = sorted(p.name for p in (lean_run / "checkpoints").glob("*.ckpt"))
    assert names == ["final.ckpt", "last.ckpt", "step_6.ckpt", "step_8.ckpt"]


def test_a_lean_run_loads_like_its_standalone_merged_export(lean_run, tmp_path):
    from stlib.data.datamodule import PerturbationDataModule

    loaded = load_any(lean_run)
    merged = export_merged(lean_run, tmp_path / "merged.ckpt")
    exported = load_any(merged)
    assert exported.config.lora.enable is False and exported.pert_map == loaded.pert_map
    dm = PerturbationDataModule(loaded.config.data, loaded.config.model.cell_set_len, 2, pert_map=loaded.pert_map)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    a = loaded.model.predict_sets(batch["basal"], batch["pert"], batch.get("batch_index"), batch.get("time_index"))
    b = exported.model.predict_sets(batch["basal"], batch["pert"], batch.get("batch_index"), batch.get("time_index"))
    torch.testing.assert_close(a["pred"], b["pred"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a["genes"], b["genes"], rtol=1e-5, atol=1e-5)


def test_a_moved_or_changed_base_is_named(tiny_study, tiny_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    cfg, overrides = _finetune(tiny_study, base, "on_a_copy", steps=2)
    run = train(cfg, overrides)
    ckpt = base / "checkpoints" / "final.ckpt"
    state = torch.load(ckpt, weights_only=False)
    key = next(k for k in state["state_dict"] if k.endswith("q_proj.weight"))
    state["state_dict"][key] = state["state_dict"][key] + 1.0
    torch.save(state, ckpt)
    with pytest.raises(ModelLoadError, match="base of .* changed"):
        load_any(run)
    shutil.rmtree(base)
    with pytest.raises(ModelLoadError, match="base of .* moved"):
        load_any(run)


class _CrashAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("variant", ["st_lora", "st_lora_mhc"])
def test_resume_from_a_step_checkpoint_is_bit_identical_with_validation_there(tiny_study, tiny_base, variant):
    """Validation runs at every checkpoint step (both every 0.25 of the run) and weights are averaged: a run
    resumed from step 4 must end exactly where the unbroken run ends."""
    cfg, overrides = _finetune(tiny_study, tiny_base, f"unbroken_{variant}", variant=variant)
    unbroken = train(cfg, overrides)
    cfg, overrides = _finetune(tiny_study, tiny_base, f"broken_{variant}", variant=variant)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, overrides, extra_callbacks=[_CrashAt(5)])
    resumed = train(cfg, overrides)  # re-run: resumes from last.ckpt (step 4)
    a = load_lightning_state_dict(unbroken / "checkpoints" / "final.ckpt")
    b = load_lightning_state_dict(resumed / "checkpoints" / "final.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
