"""The set transformer: bidirectional, order-free, HF-compatible names, the plain residual stack mHC wraps."""

from pathlib import Path

import pytest
import torch

from stlib.config import ModelConfig
from stlib.models.backbone import SetTransformer


def tiny_cfg(**kw) -> ModelConfig:
    base = {"hidden_dim": 16, "n_layers": 2, "n_heads": 4, "intermediate_size": 32, "embed_vocab_size": 10}
    return ModelConfig(**{**base, **kw})


@pytest.fixture
def backbone() -> SetTransformer:
    torch.manual_seed(0)
    return SetTransformer(tiny_cfg()).eval()


def test_every_cell_sees_every_other(backbone):
    x = torch.randn(2, 8, 16)
    y = x.clone()
    y[:, 3] += 1.0  # change one cell in the middle of the set
    out_x, out_y = backbone(x), backbone(y)
    changed = (out_x - out_y).abs().amax(dim=-1)  # [B, S]
    assert (changed > 1e-6).all(), "cells before and after the changed one must all respond (no causal mask)"


def test_permuting_cells_permutes_outputs(backbone):
    x = torch.randn(3, 8, 16)
    perm = torch.randperm(8)
    torch.testing.assert_close(backbone(x[:, perm]), backbone(x)[:, perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [{"n_kv_heads": 2}, {"head_dim": 6}, {"n_kv_heads": 1, "head_dim": 12}])
def test_grouped_kv_heads_and_free_head_dim(kw):
    cfg = tiny_cfg(**kw)
    model = SetTransformer(cfg)
    hd, kv = cfg.resolved_head_dim, cfg.resolved_kv_heads
    assert model.layers[0].self_attn.q_proj.weight.shape == (4 * hd, 16)
    assert model.layers[0].self_attn.k_proj.weight.shape == (kv * hd, 16)
    assert model.layers[0].self_attn.o_proj.weight.shape == (16, 4 * hd)
    assert model(torch.randn(2, 5, 16)).shape == (2, 5, 16)


def test_parameter_names_are_hf_llama_names(backbone):
    keys = set(backbone.state_dict())
    for name in ("embed_tokens.weight", "norm.weight", "layers.1.self_attn.q_proj.weight",
                 "layers.1.mlp.gate_proj.weight", "layers.0.mlp.down_proj.weight",
                 "layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.weight"):
        assert name in keys
    assert not any(k.endswith(".bias") for k in keys), "LLaMA layers have no biases"


def test_token_embedding_is_frozen_zero_and_unused(backbone):
    emb = backbone.embed_tokens.weight
    assert not emb.requires_grad and emb.abs().sum() == 0
    x = torch.randn(1, 4, 16)
    before = backbone(x)
    with torch.no_grad():
        emb.normal_()
    torch.testing.assert_close(backbone(x), before)


def test_forward_is_the_plain_pre_norm_residual_stack(backbone):
    x = torch.randn(2, 6, 16)
    h = x
    for layer in backbone.layers:
        h = h + layer.attn_branch(h)
        h = h + layer.mlp_branch(h)
    torch.testing.assert_close(backbone(x), backbone.norm(h))


def test_models_never_import_adapters():
    """One direction of dependency: adapters wrap models, models know nothing of adapters."""
    root = Path(__file__).resolve().parents[2] / "stlib" / "models"
    offenders = [p.name for p in root.rglob("*.py") if "stlib.adapters" in p.read_text()]
    assert not offenders, f"stlib/models imports stlib.adapters in {offenders}"
