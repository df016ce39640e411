"""Gene decoders across fine-tuning: added when the base has none, dropped when unused, read out as a change."""

import json

import numpy as np
import pytest
import torch
from stlib_testing import REPO, tiny_overrides

from stlib.config import load_config
from stlib.evaluate.predict import _config_for, predict_run, predict_split
from stlib.loading import load_any
from stlib.models.checkpoints import load_lightning_state_dict
from stlib.models.parameters import base_model
from stlib.models.state_transition import GeneDecoder
from stlib.train.run import prepare_run, train


@pytest.mark.parametrize("softplus", [True, False])
def test_a_new_decoder_starts_at_the_mean_expression(softplus):
    decoder = GeneDecoder(latent_dim=6, gene_dim=5, hidden=[8], dropout=0.0, softplus=softplus)
    torch.nn.init.zeros_(decoder.decoder[-2].weight)  # output = activation(bias) for every input
    mean = torch.tensor([0.01, 0.3, 1.0, 2.5, 6.0])
    decoder.start_at(mean)
    torch.testing.assert_close(decoder(torch.randn(3, 6)), mean.expand(3, -1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"expected \(5,\)"):
        decoder.start_at(torch.ones(4))


def _normal_equations(embed: np.ndarray, genes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    e = np.c_[embed, np.ones(len(embed))]
    return torch.from_numpy(e.T @ e), torch.from_numpy(e.T @ genes)


def test_the_linear_readout_is_fitted_by_least_squares_and_the_mlp_starts_at_zero():
    rng = np.random.default_rng(0)
    embed = rng.normal(size=(300, 6))
    weight, bias = rng.normal(size=(6, 5)), np.full(5, 20.0)  # expression stays > 0: ReLU never clips it
    genes = embed @ weight + bias
    decoder = GeneDecoder(latent_dim=6, gene_dim=5, hidden=[8], dropout=0.0, softplus=True, skip=True)
    assert isinstance(decoder.decoder[-1], torch.nn.ReLU)  # least squares is on the expression scale already
    gram, cross = _normal_equations(embed, genes)
    decoder.fit_skip(gram, cross, len(embed), ridge=0.0)
    out = decoder(torch.from_numpy(embed).float()).detach().numpy()
    np.testing.assert_allclose(out, genes, atol=1e-3)
    assert not decoder.decoder[-2].weight.any() and not decoder.decoder[-2].bias.any()

    decoder.fit_skip(gram, cross, len(embed), ridge=1.0)  # a penalty shrinks the slope, not the level
    assert decoder.skip_weight.norm() < 0.7 * torch.from_numpy(weight).float().norm()
    np.testing.assert_allclose(decoder.skip_bias.numpy(), genes.mean(0) - embed.mean(0) @ decoder.skip_weight.T.numpy(),
                               atol=1e-3)
    with pytest.raises(ValueError, match=r"expected gram \[7, 7\]"):
        decoder.fit_skip(gram[:6, :6], cross, len(embed), ridge=0.0)
    with pytest.raises(ValueError, match="skip=True"):
        GeneDecoder(6, 5, [8], 0.0, True).fit_skip(gram, cross, len(embed), ridge=0.0)


def test_fine_tuning_into_genes_adds_a_decoder_that_trains_beside_the_adapters(tiny_study, tiny_base):
    assert not load_any(tiny_base).dims["gene_dim"]  # configs/pretrain.yaml trains no decoder
    overrides = tiny_overrides(tiny_study, "new_decoder", "wound_healing.toml", 6) + [
        f"model.init_from={tiny_base}", "data.output_space=all", "model.lora.modules_to_save=[pert_encoder]",
        "model.decoder_hidden=[24]"]
    run_dir = train(load_config(REPO / "configs" / "variants" / "st_lora.yaml", overrides), overrides)
    loaded = load_any(run_dir)  # strict: the saved config describes the model that was trained
    assert "gene_decoder" in loaded.config.lora.modules_to_save
    assert loaded.config.decoder.hidden == [24]  # the fine-tune's own width: the base had no decoder to inherit
    decoder = base_model(loaded.model).gene_decoder
    assert decoder is not None and decoder.gene_dim == loaded.dims["gene_dim"]
    first = load_lightning_state_dict(run_dir / "checkpoints" / "step_5.ckpt")
    final = load_lightning_state_dict(run_dir / "checkpoints" / "final.ckpt")
    decoder_keys = [k for k in final if "gene_decoder" in k and "modules_to_save" in k]
    assert decoder_keys and any(not torch.equal(first[k], final[k]) for k in decoder_keys)  # it trained
    counts = json.loads((run_dir / "trainable_params.json").read_text())
    trained = counts["trainable"] - counts["trainable_without_decoder"]
    assert trained == sum(p.numel() for p in decoder.modules_to_save["default"].parameters())  # one copy trains
    assert counts["total"] - counts["total_without_decoder"] == 2 * trained  # beside peft's frozen original
    assert counts["fraction_without_decoder"] < counts["fraction"]  # the adapters' share, not the readout's
    adapter = torch.load(run_dir / "checkpoints" / "adapter.pt", weights_only=True)
    assert any(k.endswith("default.skip_weight") for k in adapter)  # the fitted readout travels with the adapter


def test_a_new_decoder_starts_as_the_ridge_readout_of_the_training_cells(tiny_study, tiny_base):
    overrides = tiny_overrides(tiny_study, "ridge_start", "wound_healing.toml", 0) + [
        f"model.init_from={tiny_base}", "data.output_space=all", "model.decoder_skip_ridge=0.05"]
    prep = prepare_run(load_config(REPO / "configs" / "variants" / "st_lora.yaml", overrides))
    dm = prep.datamodule
    rows = np.flatnonzero(dm.split_labels == "train")
    embed, genes = dm.store.embed[rows].astype(np.float64), np.asarray(dm.store.genes[rows].todense(), np.float64)
    centred = embed - embed.mean(0)  # ridge without penalising the intercept = ridge on centred data
    slope = np.linalg.solve(centred.T @ centred + 0.05 * len(rows) * np.eye(embed.shape[1]),
                            centred.T @ (genes - genes.mean(0)))
    decoder = base_model(prep.model).gene_decoder
    np.testing.assert_allclose(decoder.skip_weight.numpy(), slope.T, atol=1e-4)
    expected = np.maximum(embed @ slope + genes.mean(0) - embed.mean(0) @ slope, 0)
    with torch.no_grad():
        out = decoder.eval()(torch.from_numpy(embed).float()).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_runs_saved_before_the_linear_readout_still_load(tiny_study, tiny_base):
    overrides = tiny_overrides(tiny_study, "mlp_only", "wound_healing.toml", 1) + [
        f"model.init_from={tiny_base}", "data.output_space=all", "model.decoder_skip=false"]
    run_dir = train(load_config(REPO / "configs" / "variants" / "st_lora.yaml", overrides), overrides)
    config = run_dir / "config.yaml"
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                              if not line.strip().startswith("skip:")))  # as an older stlib wrote it
    assert load_config(config).decoder.skip  # the default now
    loaded = load_any(run_dir)
    assert not base_model(loaded.model).gene_decoder.skip and not loaded.config.decoder.skip


def test_a_base_decoder_is_dropped_when_fine_tuning_in_the_embedding(tiny_study, gene_base):
    assert load_any(gene_base).dims["gene_dim"]
    overrides = tiny_overrides(tiny_study, "emb_only", "wound_healing.toml", 2) + [
        f"model.init_from={gene_base}", "data.output_space=embedding"]
    run_dir = train(load_config(REPO / "configs" / "variants" / "st_lora.yaml", overrides), overrides)
    loaded = load_any(run_dir)
    assert base_model(loaded.model).gene_decoder is None and not loaded.dims["gene_dim"]


def test_residual_readout_keeps_real_genes_when_the_model_predicts_no_change(tiny_study, tiny_base, tmp_path):
    """Fresh decoder, zero shift: residual genes are the basal cells' own; direct genes are the decoder's guess."""
    overrides = tiny_overrides(tiny_study, "identity", "wound_healing.toml", 0) + [
        f"model.init_from={tiny_base}", "data.output_space=all", "model.lora.enable=false"]
    run_dir = train(load_config(REPO / "configs" / "variants" / "st_lora.yaml", overrides), overrides)

    def predicted_genes(readout):
        loaded = load_any(run_dir)
        with torch.no_grad():
            last = base_model(loaded.model).project_out
            last = last[-1] if isinstance(last, torch.nn.Sequential) else last
            last.weight.zero_()
            last.bias.zero_()  # predicted = basal exactly
        pred, real = predict_split(loaded, _config_for(loaded, ()), gene_readout=readout)
        return pred, real

    pred, real = predicted_genes("residual")
    control = (real.obs["condition"] == "Sham").to_numpy()
    real_controls, predicted = np.asarray(real.X[control]), np.asarray(pred.X[~control])
    nearest = np.sqrt(((predicted[:, None, :] - real_controls[None]) ** 2).sum(-1)).min(axis=1)
    assert nearest.max() < 1e-4  # every predicted cell is a real control cell, whatever the decoder's levels
    direct, _ = predicted_genes("direct")
    assert not np.allclose(np.asarray(direct.X[~control]), predicted, atol=1e-3)
    assert pred.uns["stlib"]["gene_readout"] == "residual"
    with pytest.raises(ValueError, match="gene_readout"):
        predict_run(run_dir, out_dir=tmp_path, gene_readout="levels")
