"""The set transformer: bidirectional, order-free, HF-compatible names, mHC hook contract."""

import pytest
import torch
from torch import nn

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


class _PlainResidual(nn.Module):
    """What mHC with one stream must reduce to; its parameter proves registration."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, h, branches):
        self.calls += 1
        for f in branches:
            h = h + self.scale * f(h)
        return h


def test_hyper_connections_hook(backbone):
    x = torch.randn(2, 6, 16)
    plain = backbone(x)
    assert backbone.hyper_connections is None
    hc = _PlainResidual()
    backbone.hyper_connections = hc
    assert "hyper_connections.scale" in backbone.state_dict()
    torch.testing.assert_close(backbone(x), plain)
    assert hc.calls == 1
    with torch.no_grad():
        hc.scale.fill_(0.0)  # no branch contributes: only the final norm remains
    torch.testing.assert_close(backbone(x), backbone.norm(x))
    assert len(backbone.branches()) == 2 * len(backbone.layers)
