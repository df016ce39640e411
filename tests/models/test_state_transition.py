"""StateTransitionModel: shapes per output space, batch encoder, confidence token, new perturbations."""

import functools

import pytest
import torch

from stlib.config import DecoderConfig, ModelConfig
from stlib.models.state_transition import ACTIVATIONS, StateTransitionModel, build_mlp

B, S, D, P = 2, 8, 12, 3
# State's decoder layout, small
Model = functools.partial(StateTransitionModel, decoder=DecoderConfig(hidden=[24, 20]))


def tiny_cfg(**kw) -> ModelConfig:
    base = {"hidden_dim": 16, "cell_set_len": S, "n_layers": 2, "n_heads": 4, "intermediate_size": 32,
            "embed_vocab_size": 10, "residual_space": "hidden"}  # State's layout
    return ModelConfig(**{**base, **kw})


def inputs(b=B, s=S, d=D, p=P, seed=0):
    g = torch.Generator().manual_seed(seed)
    basal = torch.randn(b, s, d, generator=g)
    pert = torch.nn.functional.one_hot(torch.randint(0, p, (b,), generator=g), p).float()[:, None].expand(b, s, p)
    return basal, pert.contiguous()


# output_space -> (model config changes, gene_dim); mirrors how the data module sizes the decoder
OUTPUT_SPACES = {
    "embedding": ({}, None),
    "gene": ({}, 30),
    "all": ({"final_down_then_up": True, "n_decoder_layers": 2}, 40),
}


@pytest.mark.parametrize("space", list(OUTPUT_SPACES))
def test_shapes_per_output_space(space):
    changes, gene_dim = OUTPUT_SPACES[space]
    model = Model(tiny_cfg(**changes), input_dim=D, pert_dim=P, gene_dim=gene_dim)
    out = model(*inputs())
    assert out["pred"].shape == (B, S, D)
    assert out["hidden"].shape == (B, S, 16)
    assert out["confidence"] is None
    if gene_dim is None:
        assert out["genes"] is None and model.gene_decoder is None
    else:
        assert out["genes"].shape == (B, S, gene_dim)
        assert (out["genes"] >= 0).all()


def test_training_decodes_real_cells_only_never_the_prediction():
    """The training step reads the decoder out on real cells (its loss); decoding the prediction would be wasted work.

    decode=False leaves the prediction unchanged and returns no genes; a training step's forward and losses call the decoder once."""
    from stlib.config import Config
    from stlib.train.module import STLightningModule

    torch.manual_seed(0)
    model = Model(tiny_cfg(), input_dim=D, pert_dim=P, gene_dim=30).eval()
    basal, pert = inputs()
    full, lean = model(basal, pert), model(basal, pert, decode=False)
    assert lean["genes"] is None and torch.equal(lean["pred"], full["pred"])
    calls = []
    model.gene_decoder.register_forward_hook(lambda mod, args, out: calls.append(args[0]))
    module = STLightningModule(model.train(), Config())
    target = torch.randn(B, S, D)
    batch = {"basal": basal, "pert": pert, "target": target, "target_genes": torch.rand(B, S, 30)}
    module.compute_losses(batch, module(batch), step=0)  # what training_step does, without a Trainer
    assert len(calls) == 1 and torch.equal(calls[0], target)


def test_state_attribute_names():
    model = Model(tiny_cfg(), input_dim=D, pert_dim=P, gene_dim=5)
    prefixes = {k.split(".")[0] for k in model.state_dict()}
    assert prefixes == {"pert_encoder", "basal_encoder", "transformer_backbone", "project_out", "gene_decoder"}


def test_encoder_layout_follows_n_layers():
    mlp = build_mlp(3, 8, 16, 3, 0.1, "gelu")
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Dropout"] * 2 + ["Linear"]
    assert mlp[0].in_features == 3 and mlp[-1].out_features == 8
    assert len(build_mlp(3, 8, 16, 1, 0.1, "gelu")) == 1


def test_unknown_activation_names_options():
    with pytest.raises(ValueError, match="swish.*gelu"):
        Model(tiny_cfg(activation="swish", n_encoder_layers=2), input_dim=D, pert_dim=P)
    assert "relu" in ACTIVATIONS


def test_confidence_token_gives_one_value_per_set():
    model = Model(tiny_cfg(confidence_token=True), input_dim=D, pert_dim=P)
    out = model(*inputs())
    assert out["confidence"].shape == (B,) and (out["confidence"] >= 0).all()
    assert out["pred"].shape == (B, S, D) and out["hidden"].shape == (B, S, 16)
    assert "confidence_token.confidence_token" in model.state_dict()


def test_batch_encoder_changes_outputs_and_needs_indices():
    torch.manual_seed(0)
    model = Model(tiny_cfg(batch_encoder=True), input_dim=D, pert_dim=P, n_batches=3).eval()
    basal, pert = inputs()
    a = model(basal, pert, torch.zeros(B, S, dtype=torch.long))["pred"]
    b = model(basal, pert, torch.full((B, S), 2))["pred"]
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="batch_index"):
        model(basal, pert)
    with pytest.raises(ValueError, match="n_batches"):
        Model(tiny_cfg(batch_encoder=True), input_dim=D, pert_dim=P)


def test_time_encoder_starts_silent_then_separates_time_points_and_needs_indices():
    torch.manual_seed(0)
    plain = Model(tiny_cfg(), input_dim=D, pert_dim=P).eval()
    timed = Model(tiny_cfg(time_encoder=True), input_dim=D, pert_dim=P, n_times=3).eval()
    missing, unexpected = timed.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["time_encoder.weight"] and not unexpected
    basal, pert = inputs()
    day0, day2 = torch.zeros(B, dtype=torch.long), torch.full((B,), 2)
    torch.testing.assert_close(timed(basal, pert, time_index=day2)["pred"], plain(basal, pert)["pred"])  # zero at start
    with torch.no_grad():
        timed.time_encoder.weight.normal_()
    assert (timed(basal, pert, time_index=day0)["pred"] - timed(basal, pert, time_index=day2)["pred"]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="time_index"):
        timed(basal, pert)
    with pytest.raises(ValueError, match="data.time_col"):
        Model(tiny_cfg(time_encoder=True), input_dim=D, pert_dim=P)


def test_predict_residual_adds_basal_encoding_before_projection():
    torch.manual_seed(0)
    res = Model(tiny_cfg(), input_dim=D, pert_dim=P).eval()
    plain = Model(tiny_cfg(predict_residual=False), input_dim=D, pert_dim=P).eval()
    plain.load_state_dict(res.state_dict())
    basal, pert = inputs()
    out_res, out_plain = res(basal, pert), plain(basal, pert)
    torch.testing.assert_close(out_plain["pred"], res.project_out(out_res["hidden"]))
    torch.testing.assert_close(out_res["pred"], res.project_out(out_res["hidden"] + res.basal_encoder(basal)))


def test_input_space_residual_starts_as_identity_and_learns_a_shift():
    torch.manual_seed(0)
    model = Model(tiny_cfg(residual_space="input"), input_dim=D, pert_dim=P)
    basal, pert = inputs()
    torch.testing.assert_close(model(basal, pert)["pred"], basal, rtol=0, atol=0)
    far = basal * 100 + 50  # cells unlike anything seen: still themselves
    torch.testing.assert_close(model(far, pert)["pred"], far, rtol=0, atol=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = (model(basal, pert)["pred"] - (basal + 1)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = model(basal, pert)
    shift = out["pred"] - basal
    assert shift.abs().mean() > 0.05
    torch.testing.assert_close(out["pred"], basal + model.project_out(out["hidden"]))


def test_output_relu_clamps_predictions():
    torch.manual_seed(0)
    model = Model(tiny_cfg(output_relu=True), input_dim=D, pert_dim=P)
    pred = model(*inputs())["pred"]
    assert (pred >= 0).all() and (pred == 0).any()


def test_predict_sets_is_deterministic_and_restores_mode():
    model = Model(tiny_cfg(dropout=0.5, n_encoder_layers=2), input_dim=D, pert_dim=P, gene_dim=4)
    model.train()
    basal, pert = inputs()
    a, b = model.predict_sets(basal, pert), model.predict_sets(basal, pert)
    torch.testing.assert_close(a["pred"], b["pred"])
    assert not a["pred"].requires_grad
    assert model.training


def test_extend_perturbations_keeps_old_outputs():
    torch.manual_seed(0)
    model = Model(tiny_cfg(), input_dim=D, pert_dim=P, gene_dim=6).eval()
    basal, pert = inputs()
    before = model(basal, pert)
    old_w = model.pert_encoder[0].weight.detach().clone()
    model.extend_perturbations(P + 2)
    assert model.pert_dim == P + 2 and model.pert_encoder[0].in_features == P + 2
    padded = torch.cat([pert, torch.zeros(B, S, 2)], dim=-1)
    after = model(basal, padded)
    torch.testing.assert_close(after["pred"], before["pred"])
    torch.testing.assert_close(after["genes"], before["genes"])
    new_w = model.pert_encoder[0].weight.detach()
    torch.testing.assert_close(new_w[:, :P], old_w)
    torch.testing.assert_close(new_w[:, P], old_w.mean(dim=1))  # the "generic perturbation"
    assert model.pert_encoder[0].weight.requires_grad


def test_extend_perturbations_explicit_columns_and_errors():
    model = Model(tiny_cfg(), input_dim=D, pert_dim=P)
    cols = torch.arange(16.0)[:, None]
    model.extend_perturbations(P + 1, cols)
    torch.testing.assert_close(model.pert_encoder[0].weight[:, P:].detach(), cols)
    with pytest.raises(ValueError, match="shape"):
        model.extend_perturbations(P + 3, torch.zeros(3, 16))
    with pytest.raises(ValueError, match="smaller"):
        model.extend_perturbations(P - 1)


def test_forward_rejects_mismatched_inputs():
    model = Model(tiny_cfg(), input_dim=D, pert_dim=P)
    basal, pert = inputs()
    with pytest.raises(ValueError, match=r"\[B, S, D\]"):
        model(basal, pert[:, :5])


def test_velocity_displacement_starts_silent_then_moves_cells_along_their_velocity():
    plain = Model(tiny_cfg(), input_dim=D, pert_dim=P)
    moved = Model(tiny_cfg(), input_dim=D, pert_dim=P, velocity_displacement=True)
    moved.load_state_dict(plain.state_dict(), strict=False)
    basal, pert = inputs()
    velocity = torch.randn(B, S, D, generator=torch.Generator().manual_seed(1))
    before = plain.predict_sets(basal, pert)["pred"]
    torch.testing.assert_close(moved.predict_sets(basal, pert, velocity=velocity)["pred"], before)  # gains start at 0
    with torch.no_grad():
        moved.velocity_displacement.gain.copy_(torch.tensor([0.0, 2.0, -1.0]))
    gain = (pert @ moved.velocity_displacement.gain).unsqueeze(-1)  # each set's perturbation picks its gain
    torch.testing.assert_close(moved.predict_sets(basal, pert, velocity=velocity)["pred"], before + gain * velocity)
    with pytest.raises(ValueError, match="pass velocity with the basal cells' shape"):
        moved(basal, pert)
    with pytest.raises(ValueError, match=r"got \(2, 8, 3\)"):
        moved(basal, pert, velocity=velocity[..., :3])


def test_new_perturbations_get_a_zero_velocity_gain():
    model = Model(tiny_cfg(), input_dim=D, pert_dim=P, velocity_displacement=True)
    with torch.no_grad():
        model.velocity_displacement.gain.fill_(0.5)
    model.extend_perturbations(P + 2)
    torch.testing.assert_close(model.velocity_displacement.gain, torch.tensor([0.5, 0.5, 0.5, 0.0, 0.0]))
    basal, _ = inputs()
    new = torch.nn.functional.one_hot(torch.full((B, S), P + 1), P + 2).float()
    velocity = torch.randn(B, S, D)
    out = model.predict_sets(basal, new, velocity=velocity)["pred"]
    torch.testing.assert_close(out, model.predict_sets(basal, new, velocity=torch.zeros_like(velocity))["pred"])


def test_set_dropout_reaches_every_encoder_dropout_and_says_when_there_is_none():
    deep = Model(tiny_cfg(n_encoder_layers=2, n_decoder_layers=2, confidence_token=True),
                                input_dim=D, pert_dim=P)
    assert deep.set_dropout(0.3) == 5  # pert/basal encoder, project_out, two in the confidence head
    rates = {m.p for name, m in deep.named_modules() if isinstance(m, torch.nn.Dropout) and "gene_decoder" not in name}
    assert rates == {0.3} and deep.cfg.dropout == 0.0  # the config it was built from is not rewritten
    assert Model(tiny_cfg(), input_dim=D, pert_dim=P).set_dropout(0.3) == 0  # single Linear layers
