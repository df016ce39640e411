"""Training end to end on tiny generated data: run dir, logs, variants, frozen weights, resume, NaN guard."""

import itertools
import json

import lightning as L
import numpy as np
import pytest
import torch
from runs import VARIANTS, finetune_cfg
from stlib_testing import REPO, STATE_FIXTURE, tiny_overrides

from stlib.config import ConfigError, load_config
from stlib.data.errors import DataError
from stlib.evaluate.predict import _config_for, predict_split
from stlib.evaluate.tensorboard import read_scalars
from stlib.finetune import extend_pert_map
from stlib.loading import load_any
from stlib.models.checkpoints import load_lightning_state_dict
from stlib.models.parameters import base_model
from stlib.train.module import NonFiniteLossError, STLightningModule, warmup_cosine
from stlib.train.run import prepare_run, train


def test_pretrain_writes_a_complete_run_dir_and_learns(tiny_base):
    for name in ("config.yaml", "model_dims.json", "pert_onehot_map.pt", "cell_type_onehot_map.torch",
                 "trainable_params.json", "run_summary.json", "checkpoints/final.ckpt", "checkpoints/last.ckpt"):
        assert (tiny_base / name).exists(), name
    steps = load_config(tiny_base / "config.yaml").training
    newest = {steps.max_steps - i * int(steps.ckpt_every_n_steps) for i in range(steps.keep_checkpoints)}
    assert {p.name for p in (tiny_base / "checkpoints").glob("step_*.ckpt")} == {f"step_{s}.ckpt" for s in newest}
    scalars = read_scalars(tiny_base)
    tags = set(scalars.tag)
    assert {"train/loss", "train/energy", "val/loss", "train/grad_norm", "lr", "perf/cells_per_sec"} <= tags
    loss = scalars[scalars.tag == "train/loss"].sort_values("step").value.to_numpy()
    assert loss[-5:].mean() < 0.9 * loss[:5].mean(), "pretraining did not reduce the loss"
    assert json.loads((tiny_base / "run_summary.json").read_text())["steps"] == 30


def test_lr_schedule_warms_up_then_decays():
    lrs = [warmup_cosine(s, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_control_shares_the_base_column_and_new_perturbations_get_new_ones():
    mapping, new = extend_pert_map({"DMSO": 0, "drugA": 1}, "DMSO", ["Sham", "Burn"], "Sham")
    assert mapping == {"DMSO": 0, "drugA": 1, "Sham": 0, "Burn": 2} and new == ["Burn"]
    with pytest.raises(ConfigError, match="cannot place control 'Sham'"):
        extend_pert_map({"drugA": 0}, None, ["Sham"], "Sham")


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_fine_tunes_from_the_base(finetuned, variant):
    run_dir = finetuned(variant)
    loaded = load_any(run_dir)
    assert loaded.pert_map["Sham"] == loaded.pert_map["DMSO_TF"]  # the control reuses the base's column
    assert "Burn" in loaded.pert_map
    trainable = json.loads((run_dir / "trainable_params.json").read_text())["fraction"]
    tags = set(read_scalars(run_dir).tag) if variant != "baseline" else set()
    if variant == "baseline":
        assert not (run_dir / "tensorboard").exists()  # nothing trained
        return
    assert trainable < 0.5  # LoRA: a fraction of the weights
    assert ("mhc/amax_gain_forward" in tags) == ("mhc" in variant)
    mhc_params = [p for n, p in loaded.model.named_parameters() if "hyper_connections" in n]
    assert bool(mhc_params) == ("mhc" in variant) and all(p.requires_grad for p in mhc_params)
    assert ("train/velocity_loss" in tags) == ("velocity" in variant)
    assert (run_dir / "checkpoints" / "adapter.pt").exists()


def test_lora_fine_tuning_leaves_the_base_weights_untouched(finetuned, tiny_base):
    run_dir = finetuned("st_lora")
    base = load_lightning_state_dict(tiny_base / "checkpoints" / "final.ckpt")
    # the checkpoint holds what trained; loading rebuilds the frozen part from the base, which must be it exactly
    tuned = load_any(run_dir).model.state_dict()
    prefix = "base_model.model."
    checked = 0
    for key, value in base.items():
        if key.startswith(("pert_encoder.", "transformer_backbone.embed_tokens")):
            continue  # the perturbation encoder trains (new Burn column); embed_tokens is unused
        lora_key = prefix + key.replace(".weight", ".base_layer.weight") if "_proj.weight" in key else prefix + key
        if lora_key not in tuned and prefix + key in tuned:
            lora_key = prefix + key
        if any(p in key for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            lora_key = prefix + key.replace(".weight", ".base_layer.weight")
        torch.testing.assert_close(tuned[lora_key], value, rtol=0, atol=0, msg=key)
        checked += 1
    assert checked > 10
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in tuned.items())  # the adapters did learn


class _CrashAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("average", ["null", "0.25"])  # 0.25: the weight average starts at step 2, before the crash
def test_resumed_run_ends_where_an_unbroken_run_ends(tiny_study, average):
    """8 steps, a checkpoint at 4, a crash at 6: the resume replays steps 4-5 (dropout, data order, the average)."""
    common = tiny_overrides(tiny_study, f"unbroken{average}", "source_perturbations.toml", 8) + [
        "training.ckpt_every_n_steps=4", "model.dropout=0.1", f"training.average_weights_from={average}"]
    cfg = load_config(REPO / "configs" / "pretrain.yaml", common)
    unbroken = train(cfg, common)

    broken_overrides = [*common, f"name=broken{average}"]
    cfg_b = load_config(REPO / "configs" / "pretrain.yaml", broken_overrides)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg_b, broken_overrides, extra_callbacks=[_CrashAt(6)])
    assert json.loads((cfg_b.run_dir / "run_summary.json").read_text())["status"] == "failed"
    assert not (cfg_b.run_dir / "checkpoints" / "final.ckpt").exists()
    resumed = train(cfg_b, broken_overrides)  # re-run into the same run dir: resumes from last.ckpt (step 4)

    a = load_lightning_state_dict(unbroken / "checkpoints" / "final.ckpt")
    b = load_lightning_state_dict(resumed / "checkpoints" / "final.ckpt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    steps = read_scalars(resumed)
    assert steps[steps.tag == "train/loss"].step.max() >= 7


class _RecordWeights(L.Callback):
    def __init__(self):
        self.after_step = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters() if p.requires_grad]


def test_final_weights_are_the_average_of_the_steps_from_average_weights_from(tiny_study):
    overrides = tiny_overrides(tiny_study, "averaged", "source_perturbations.toml", 8) + [
        "training.average_weights_from=0.5"]
    record = _RecordWeights()
    run_dir = train(load_config(REPO / "configs" / "pretrain.yaml", overrides), overrides, extra_callbacks=[record])
    expected = [torch.stack(ws).mean(0) for ws in zip(*(record.after_step[k] for k in (5, 6, 7, 8)))]
    loaded = load_any(run_dir)
    final = [p for p in loaded.model.parameters() if p.requires_grad]
    assert len(final) == len(expected)
    for got, want in zip(final, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    last = load_lightning_state_dict(run_dir / "checkpoints" / "last.ckpt")  # the raw weights of step 8
    assert not all(torch.equal(a, b) for a, b in zip(last.values(), load_lightning_state_dict(
        run_dir / "checkpoints" / "final.ckpt").values()))
    with pytest.raises(ConfigError, match=r"training.average_weights_from must be in \[0, 1\)"):
        load_config(REPO / "configs" / "pretrain.yaml", ["training.average_weights_from=1.5"])


class _PoisonAt(L.Callback):
    """Turns one weight into NaN, as a diverging run would."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(p for p in pl_module.parameters() if p.requires_grad).fill_(float("nan"))


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tiny_study):
    overrides = tiny_overrides(tiny_study, "nan_run", "source_perturbations.toml", 8)  # checkpoint at 5, NaN at 7
    cfg = load_config(REPO / "configs" / "pretrain.yaml", overrides)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 7.*last checkpoint"):
        train(cfg, overrides, extra_callbacks=[_PoisonAt(7)])
    last = load_lightning_state_dict(cfg.run_dir / "checkpoints" / "last.ckpt")
    assert all(torch.isfinite(v).all() for v in last.values())


@pytest.mark.parametrize("override, error, match", [
    ("data.pert_col=treatment", DataError, r"obs column 'treatment' \(data.pert_col\) not in .*wound_healing.h5ad; obs columns: .*'condition'"),
    ("data.control_pert=PBS", DataError, r"control 'PBS' \(data.control_pert\).*'Burn', 'Sham'"),
    ("data.embed_key=X_pca", DataError, r"obsm 'X_pca' \(data.embed_key\) not found.*X_state"),
    ("model.init_from=/nowhere/base", ValueError, r"model path not found: /nowhere/base"),
    ("model.time_encoder=true data.time_col=null", ConfigError, r"model.time_encoder=true needs .*data.time_col"),
])
def test_bad_input_fails_before_any_training(tiny_study, tiny_base, override, error, match):
    cfg, overrides = finetune_cfg(tiny_study, tiny_base, "st_lora", extra=["name=bad_input", *override.split()])
    with pytest.raises(error, match=match):
        train(cfg, overrides)
    assert not (cfg.run_dir / "checkpoints").exists()


def test_velocity_variant_without_velocity_says_what_to_run(tiny_study, tiny_base, tmp_path):
    import anndata as ad

    src = ad.read_h5ad(tiny_study / "data" / "wound_healing.h5ad")
    for key in [k for k in src.obsm if k.startswith("velocity_")]:
        del src.obsm[key]
    src.write_h5ad(tmp_path / "wound_healing.h5ad")
    (tmp_path / "wound_healing.toml").write_text((tiny_study / "data" / "wound_healing.toml").read_text())
    cfg, overrides = finetune_cfg(tiny_study, tiny_base, "st_lora_velocity",
                                  extra=["name=no_velocity", f"data.toml_config_path={tmp_path / 'wound_healing.toml'}"])
    with pytest.raises(DataError, match=r"velocity_X_state.*run `stlib velocity"):
        train(cfg, overrides)


def test_training_is_deterministic_for_a_seed(tiny_study):
    outs = []
    for name in ("seed_a", "seed_b"):
        overrides = tiny_overrides(tiny_study, name, "source_perturbations.toml", 3)
        run = train(load_config(REPO / "configs" / "pretrain.yaml", overrides), overrides)
        outs.append(load_lightning_state_dict(run / "checkpoints" / "final.ckpt"))
    key = next(k for k in outs[0] if k.endswith("q_proj.weight"))
    assert np.array_equal(outs[0][key].numpy(), outs[1][key].numpy())


FINETUNE_CHOICES = {"allow_other_input", "cell_set_len", "dropout", "init_from", "time_encoder"}


def test_every_model_field_is_either_inherited_from_the_base_or_a_fine_tuning_choice():
    import dataclasses

    from stlib.config import ARCHITECTURE_FIELDS, ModelConfig

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert fields == set(ARCHITECTURE_FIELDS) | FINETUNE_CHOICES, "classify the new ModelConfig field"
    assert not set(ARCHITECTURE_FIELDS) & FINETUNE_CHOICES




@pytest.mark.slow
@pytest.mark.skipif(not STATE_FIXTURE.exists(), reason="../shared/fixtures not present")
def test_fine_tunes_from_a_real_state_run_dir(tmp_path):
    overrides = [
        f"model.init_from={STATE_FIXTURE}", f"data.toml_config_path={STATE_FIXTURE / 'task.toml'}",
        "data.embed_key=X_emb", "data.cell_type_key=cell_type", "data.output_space=gene", "data.gene_layer=null",
        "model.cell_set_len=16", f"output_dir={tmp_path}", "name=from_state", "training.max_steps=4",
        "training.batch_size=2", "training.val_every_n_steps=2", "training.progress_bar=false",
    ]
    run_dir = train(load_config(REPO / "configs" / "variants" / "st_lora.yaml", overrides), overrides)
    loaded = load_any(run_dir)
    assert loaded.config.model.hidden_dim == 32 and loaded.config.model.n_layers == 2  # State's architecture
    assert loaded.config.model.embed_vocab_size == 32000  # even the unused embedding keeps State's shape
    assert set(loaded.pert_map) == {"Burn", "Sham"}


def test_gene_decoder_run_predicts_genes_with_real_names(tiny_study, gene_base, tmp_path):
    import anndata as ad

    from stlib.evaluate.predict import predict_run

    run_dir = gene_base  # pretrained with data.output_space=all on the wound data
    scalars = read_scalars(run_dir)
    assert "train/gene_loss" in set(scalars.tag)
    pred_path, real_path = predict_run(run_dir, split="test", out_dir=tmp_path)
    pred, real = ad.read_h5ad(pred_path), ad.read_h5ad(real_path)
    source = ad.read_h5ad(tiny_study / "data" / "wound_healing.h5ad")
    assert list(pred.var_names) == list(real.var_names) == list(source.var_names)  # cell-eval: same genes, order
    assert pred.uns["stlib"]["space"] == "gene" and pred.obsm["X_state"].shape[1] == 16
    assert set(pred.obs["condition"]) == {"Burn", "Sham"} and set(pred.obs["cell_types_simple_short"]) == {
        "Fibroblast", "Macrophage"}  # the held-out (zero-shot) test cell types
    control = (pred.obs["condition"] == "Sham").to_numpy()
    np.testing.assert_array_equal(pred.X[control], real.X[control])  # the same real controls in both files
    assert not np.allclose(pred.X[~control], real.X[~control])
    # every predicted cell names the real control it was made from: same cell type and day, a control row
    by_source = real.obs.set_index("source_index")
    basal = by_source.loc[pred.obs["basal_index"].to_numpy()]
    assert (basal["condition"] == "Sham").all()
    np.testing.assert_array_equal(basal["cell_types_simple_short"].astype(str).to_numpy(),
                                  pred.obs["cell_types_simple_short"].astype(str).to_numpy())
    np.testing.assert_array_equal(basal["day"].to_numpy(), pred.obs["day"].to_numpy())
    np.testing.assert_array_equal(pred.obs["basal_index"][control], pred.obs["source_index"][control])
    direct = ad.read_h5ad(predict_run(run_dir, out_dir=tmp_path / "direct", gene_readout="direct")[0])
    assert (direct.X >= 0).all()  # the decoder's own output is non-negative expression


@pytest.mark.parametrize("clip", [None, 0.5])
def test_grad_norm_is_logged_before_clipping_and_clipping_applies(clip, monkeypatch):
    from stlib.config import Config
    from stlib.train.module import STLightningModule

    module = STLightningModule(torch.nn.Linear(4, 3), Config())
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    for p in module.parameters():
        p.grad = torch.full_like(p, 2.0)
    raw = float(torch.linalg.vector_norm(torch.cat([p.grad.ravel() for p in module.parameters()])))
    module.configure_gradient_clipping(None, gradient_clip_val=clip, gradient_clip_algorithm=None)
    after = float(torch.linalg.vector_norm(torch.cat([p.grad.ravel() for p in module.parameters()])))
    assert logged["train/grad_norm"] == pytest.approx(raw)  # the raw norm, whatever clipping does next
    assert after == pytest.approx(raw if clip is None else clip, rel=1e-5)


def test_a_time_encoder_is_added_to_the_base_trained_and_used_for_prediction(tiny_study, tiny_base, tmp_path):
    import anndata as ad

    from stlib.evaluate.predict import predict_run

    cfg, overrides = finetune_cfg(tiny_study, tiny_base, "st_lora", steps=6, extra=["name=timed",
                                                                                  "model.time_encoder=true"])
    run_dir = train(cfg, overrides)
    loaded = load_any(run_dir)  # strict: config.yaml + model_dims.json describe the model with its time encoder
    assert loaded.config.model.time_encoder and loaded.dims["time_values"] == ["10", "14", "19"]
    weights = load_lightning_state_dict(run_dir / "checkpoints" / "final.ckpt")
    (key,) = [k for k in weights if "time_encoder" in k]
    assert weights[key].abs().sum() > 0  # started at zero, trained beside the adapters
    pred = ad.read_h5ad(predict_run(run_dir, out_dir=tmp_path)[0])
    assert set(pred.obs["day"].astype(str)) == {"10", "14", "19"}


def test_velocity_displacement_is_added_to_a_base_trains_faster_and_predicts_from_velocity(velocity_data, tiny_base,
                                                                                           finetuned):
    cfg, _ = finetune_cfg(velocity_data, tiny_base, "st_lora_velocity", extra=["model.velocity_gain_lr_scale=50"])
    assert cfg.velocity.displacement  # the velocity variants' configs turn it on
    prep = prepare_run(cfg)
    module = STLightningModule(prep.model, prep.cfg)
    groups = module.configure_optimizers()["optimizer"].param_groups
    gain_group = [g for g in groups if any(p is base_model(prep.model).velocity_displacement.gain for p in g["params"])]
    assert len(gain_group) == 1 and gain_group[0]["initial_lr"] == pytest.approx(50 * cfg.training.lr)
    assert gain_group[0]["weight_decay"] == 0.0

    run_dir = finetuned("st_lora_velocity")  # the variant as shipped (velocity_gain_lr_scale: its default)
    loaded = load_any(run_dir)  # strict: the run's config rebuilds the gains
    gain = base_model(loaded.model).velocity_displacement.gain.detach()
    assert gain.abs().max() > 0  # it trained (zero at start, and a LoRA run freezes what it does not adapt)
    pred, _ = predict_split(loaded, _config_for(loaded, ()))
    assert pred.n_obs > 0

    again, _ = finetune_cfg(velocity_data, run_dir, "st_lora", extra=["name=from_displaced"])
    assert not again.velocity.displacement  # st_lora does not ask for it, but its base has it
    prep = prepare_run(again)
    assert prep.cfg.velocity.displacement and prep.datamodule.store.velocity is not None
    torch.testing.assert_close(base_model(prep.model).velocity_displacement.gain.detach(), gain)

    import anndata as ad

    path = velocity_data / "data" / "wound_healing.h5ad"
    no_velocity = ad.read_h5ad(path)
    for key in [k for k in no_velocity.obsm if k.startswith("velocity_")]:
        del no_velocity.obsm[key]
    other = velocity_data / "no_velocity"
    other.mkdir(exist_ok=True)
    no_velocity.write_h5ad(other / "wound_healing.h5ad")
    (other / "wound_healing.toml").write_text((velocity_data / "data" / "wound_healing.toml").read_text())
    with pytest.raises(DataError, match=r"velocity_X_state.*run `stlib velocity"):
        predict_split(loaded, _config_for(loaded, [f"data.toml_config_path={other / 'wound_healing.toml'}"]))


def test_a_fine_tune_sets_its_own_dropout_on_the_base(tiny_study):
    overrides = tiny_overrides(tiny_study, "deep_base", "source_perturbations.toml", 2) + ["model.n_encoder_layers=2"]
    base = train(load_config(REPO / "configs" / "pretrain.yaml", overrides), overrides)
    assert load_any(base).config.model.dropout == 0.0
    cfg, _ = finetune_cfg(tiny_study, base, "st_lora", extra=["name=dropout_ft", "model.dropout=0.2"])
    model = base_model(prepare_run(cfg).model)
    rates = [m.p for m in model.basal_encoder.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates == [0.2] and prepare_run(cfg).cfg.model.dropout == 0.2
