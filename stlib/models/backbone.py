"""LLaMA-style bidirectional transformer over a *set* of cells, in plain torch.

State's transition model runs HF ``LlamaModel`` with the causal mask switched off, rotary embeddings made
the identity and the token embedding zeroed: cells in a set have no order, so there is no positional
signal at all, and every cell attends to every other. We rebuild exactly that with
``scaled_dot_product_attention`` (fast on CPU and GPU, no HF dependency) and keep HF's parameter names
(``embed_tokens``, ``layers.{i}.self_attn.q_proj`` ..., ``norm``) so State checkpoints load strictly.

Each layer exposes its two residual branches (``attn_branch``, ``mlp_branch``) and the stack its final
``norm``: that is all the mHC adapter (manifold-constrained hyper-connections) needs to wrap it. This
module knows nothing of mHC; the forward is the plain pre-norm residual stack.

Shapes: B sets, S cells per set, D hidden width, Hq query heads, Hkv key/value heads, d head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stlib.config import ModelConfig

# State keeps (and never uses) a token embedding of LlamaConfig's default vocabulary size.
STATE_VOCAB_SIZE = 32000


class SetAttention(nn.Module):
    """Multi-head self-attention without mask or positions; grouped key/value heads supported."""

    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim, self.dropout = n_heads, n_kv_heads, head_dim, dropout
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, D] -> [B, S, D]."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)  # [B, Hq, S, d]
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, S, d]
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.n_kv_heads != self.n_heads:
            group = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=False)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    """LLaMA's gated MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SetTransformerLayer(nn.Module):
    """Pre-norm block; the two residual branches are separate methods so mHC can wrap them."""

    def __init__(self, cfg: ModelConfig, attention_dropout: float = 0.0):
        super().__init__()
        d = cfg.hidden_dim
        self.self_attn = SetAttention(d, cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim, attention_dropout)
        self.mlp = SwiGLU(d, cfg.intermediate_size)
        self.input_layernorm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)

    def attn_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.self_attn(self.input_layernorm(x))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.post_attention_layernorm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_branch(x)
        return x + self.mlp_branch(x)


class SetTransformer(nn.Module):
    """Stack of bidirectional LLaMA layers + final RMSNorm; input is already embedded ([B, S, D])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Unused: present only so State's `transformer_backbone.embed_tokens.weight` has a home. Zero and frozen.
        self.embed_tokens = nn.Embedding(cfg.embed_vocab_size, cfg.hidden_dim)
        nn.init.zeros_(self.embed_tokens.weight)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(SetTransformerLayer(cfg, cfg.attention_dropout) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.hidden_dim, eps=cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[B, S, D] -> [B, S, D]: the residual layers (h <- h + F(h) per branch), then the final norm."""
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)
