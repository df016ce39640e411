"""LoRA through peft: only adapters (and modules_to_save) train, off == base, merge == adapters, round-trips."""

import copy

import pytest
import torch

from stlib.adapters.lora import adapter_state_dict, apply_lora, load_adapter, merge_lora
from stlib.config import DecoderConfig, LoraConfig, ModelConfig
from stlib.models.parameters import base_model, count_parameters, trainable_summary
from stlib.models.state_transition import StateTransitionModel

D, P, G = 12, 3, 10


def tiny_model(seed=0) -> StateTransitionModel:
    torch.manual_seed(seed)
    # hidden-space residual: a fresh model is not the identity, so adapters visibly change its outputs
    cfg = ModelConfig(hidden_dim=32, n_layers=2, n_heads=4, intermediate_size=64, cell_set_len=6,
                      residual_space="hidden")
    return StateTransitionModel(cfg, input_dim=D, pert_dim=P, gene_dim=G, decoder=DecoderConfig(hidden=[16]))


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    basal = torch.randn(2, 6, D, generator=g)
    pert = torch.nn.functional.one_hot(torch.tensor([1, 2]), P).float()[:, None, :].expand(2, 6, P)
    return basal, pert


def lora_cfg(**kw) -> LoraConfig:
    return LoraConfig(enable=True, r=4, alpha=8, dropout=0.0, **kw)


def randomise_adapters(model):
    """peft initialises lora_B to zero (adapters start as a no-op); give them a value so tests can see them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def test_disabled_is_the_base_model():
    model = tiny_model()
    assert apply_lora(model, LoraConfig(enable=False)) is model


def test_fresh_adapters_do_not_change_outputs_and_only_adapters_train():
    base = tiny_model()
    ref = base.predict_sets(*inputs())["pred"]
    model = apply_lora(copy.deepcopy(base), lora_cfg())
    torch.testing.assert_close(base_model(model).predict_sets(*inputs())["pred"], ref)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("q_proj.lora_A" in n for n in trainable) and not any("gate_proj.lora" in n for n in trainable)
    assert any("pert_encoder.modules_to_save" in n for n in trainable)
    n_train, n_total = count_parameters(model)
    assert 0 < n_train < n_total
    assert trainable_summary(model).startswith(f"trainable params: {n_train:,} / {n_total:,} (")


def test_adapt_mlp_adds_mlp_targets():
    model = apply_lora(tiny_model(), lora_cfg(adapt_mlp=True))
    assert any("gate_proj.lora_A" in n for n, _ in model.named_parameters())


def test_unknown_target_module_is_a_clear_error():
    with pytest.raises(ValueError, match=r"target_modules: \['qkv'\] not found"):
        apply_lora(tiny_model(), lora_cfg(target_modules=["qkv"]))


def test_training_changes_adapters_but_never_frozen_weights():
    model = apply_lora(tiny_model(), lora_cfg())
    # frozen by name, not by requires_grad (that would be the property under test), and an optimizer over every
    # parameter with weight decay: a base weight apply_lora forgot to freeze would get a gradient and move
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()
              if "lora_" not in n and "modules_to_save" not in n}
    assert any("q_proj.base_layer.weight" in n for n in frozen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = base_model(model).predict_sets(*inputs())["pred"]
    for _ in range(3):
        out = model(*inputs())
        loss = (out["pred"] ** 2).mean() + out["genes"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, param in model.named_parameters():
        if name in frozen:
            torch.testing.assert_close(param, frozen[name], rtol=0, atol=0, msg=f"frozen weight {name} changed")
    assert not torch.allclose(base_model(model).predict_sets(*inputs())["pred"], before)


def test_merged_model_equals_adapter_model():
    model = apply_lora(tiny_model(), lora_cfg())
    randomise_adapters(model)
    with_adapters = base_model(model).predict_sets(*inputs())
    merged = merge_lora(model)
    assert isinstance(merged, StateTransitionModel)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    out = merged.predict_sets(*inputs())
    torch.testing.assert_close(out["pred"], with_adapters["pred"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["genes"], with_adapters["genes"], atol=1e-5, rtol=1e-5)


def test_adapter_file_round_trips_onto_a_fresh_base(tmp_path):
    model = apply_lora(tiny_model(), lora_cfg())
    randomise_adapters(model)
    state = adapter_state_dict(model)
    total = sum(v.numel() for v in model.state_dict().values())
    assert sum(v.numel() for v in state.values()) < total / 2  # small: adapters + saved modules only
    torch.save(state, tmp_path / "adapter.pt")
    fresh = apply_lora(tiny_model(), lora_cfg())  # same base weights (same seed), fresh adapters
    assert not torch.allclose(base_model(fresh).predict_sets(*inputs())["pred"],
                              base_model(model).predict_sets(*inputs())["pred"])
    load_adapter(fresh, tmp_path / "adapter.pt")
    torch.testing.assert_close(base_model(fresh).predict_sets(*inputs())["pred"],
                               base_model(model).predict_sets(*inputs())["pred"])


def test_adapter_for_another_architecture_is_refused():
    model = apply_lora(tiny_model(), lora_cfg(adapt_mlp=True))
    other = apply_lora(tiny_model(), lora_cfg())
    with pytest.raises(ValueError, match="adapter has tensors this model lacks"):
        load_adapter(other, adapter_state_dict(model))
