"""mHC: Sinkhorn accuracy/dtypes/gradients, identity at init, training moves it, off means baseline.

The reference for the fast paths is `eager_streams`: the paper's update in plain autograd ops through
`reference_coefficients`; both kernels (torch, numba) are checked against it and against each other.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stlib.adapters.mhc import KERNELS, ManifoldHyperConnections, MHCBackbone, MHCError, apply_mhc, sinkhorn_knopp
from stlib.config import MHC_KERNELS, ConfigError, MHCConfig


def ds_error(p: torch.Tensor) -> float:
    p = p.double()
    return max((p.sum(-1) - 1).abs().max().item(), (p.sum(-2) - 1).abs().max().item())


class ToyLayer(nn.Module):
    """Pre-norm attention + MLP with the two residual branches the backbone contract names."""

    def __init__(self, d: int):
        super().__init__()
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def attn_branch(self, x):
        q, k, v = self.qkv(self.n1(x)).chunk(3, dim=-1)
        return self.o(F.scaled_dot_product_attention(q, k, v))

    def mlp_branch(self, x):
        return self.down(F.gelu(self.up(self.n2(x))))


class ToyBackbone(nn.Module):
    """The plain pre-norm residual stack (as stlib.models.backbone.SetTransformer)."""

    def __init__(self, d: int = 16, n_layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(ToyLayer(d) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d)

    def branches(self):
        return [f for layer in self.layers for f in (layer.attn_branch, layer.mlp_branch)]

    def forward(self, h):
        for f in self.branches():
            h = h + f(h)
        return self.norm(h)


class ToyModel(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.transformer_backbone = ToyBackbone(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.transformer_backbone(x))


def toy_pair(seed: int = 0, n_streams: int = 4):
    torch.manual_seed(seed)
    plain = ToyModel()
    wrapped = ToyModel()
    wrapped.load_state_dict(plain.state_dict())
    apply_mhc(wrapped, MHCConfig(n_streams=n_streams))
    return plain, wrapped


# ------------------------------------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize("scale", [1.0, 10.0, 50.0])
@pytest.mark.parametrize("kernel", ["torch", "numba"])
def test_sinkhorn_doubly_stochastic_at_large_logit_scales(scale, kernel):
    """The paper's 20-sweep iteration leaves column errors of 0.5 at scale 10; ours must reach 1e-4 up to 50."""
    torch.manual_seed(int(scale))
    p = sinkhorn_knopp(torch.randn(3000, 4, 4) * scale, n_iters=20, kernel=kernel)
    assert torch.isfinite(p).all()
    assert (p >= 0).all()
    assert ds_error(p) <= 1e-4


@pytest.mark.parametrize("kernel", ["torch", "numba"])
def test_sinkhorn_near_permutation_stays_finite(kernel):
    """A logit matrix (scale 50) where a long full Newton step underflowed entries to exact zeros and the next
    step made NaN; only steps in the quadratic phase may be taken undamped."""
    logits = torch.tensor([[-46.16358185, 26.14789581, -37.75613403, -28.88732529],
                           [11.89977169, 104.58829498, -80.00814056, 63.19247055],
                           [74.79837799, -20.59733772, 48.73163223, 59.47954178],
                           [22.73957825, 58.65235901, -2.26494145, 36.91592789]], dtype=torch.float64)
    p = sinkhorn_knopp(logits.expand(3, 4, 4), kernel=kernel)
    assert torch.isfinite(p).all()
    assert ds_error(p) <= 1e-4


@pytest.mark.parametrize("kernel", ["torch", "numba"])
def test_sinkhorn_other_sizes_and_leading_dims(kernel):
    torch.manual_seed(1)
    p = sinkhorn_knopp(torch.randn(2, 5, 3, 3) * 5, kernel=kernel)
    assert p.shape == (2, 5, 3, 3)
    assert ds_error(p) <= 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-9), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("kernel", ["torch", "numba"])
def test_sinkhorn_dtype_in_equals_dtype_out(dtype, tol, kernel):
    torch.manual_seed(2)
    logits = (torch.randn(256, 4, 4) * 3).to(dtype)
    p = sinkhorn_knopp(logits, tol=1e-10, kernel=kernel)
    assert p.dtype == dtype
    assert ds_error(p) <= tol  # the projection is float64 inside; only the final cast rounds


@pytest.mark.parametrize("kernel", ["torch", "numba"])
def test_sinkhorn_gradient_matches_unrolled_log_domain_iteration(kernel):
    """Implicit backward == autograd through a long (converged) log-domain Sinkhorn, in float64."""
    torch.manual_seed(3)
    logits = (torch.randn(32, 4, 4, dtype=torch.float64) * 1.5).requires_grad_()
    weight = torch.randn(32, 4, 4, dtype=torch.float64)
    (ours,) = torch.autograd.grad((sinkhorn_knopp(logits, n_iters=500, tol=1e-13, kernel=kernel) * weight).sum(), logits)
    f = torch.zeros(32, 4, dtype=torch.float64)
    g = torch.zeros(32, 4, dtype=torch.float64)
    for _ in range(500):
        f = -torch.logsumexp(logits + g.unsqueeze(-2), -1)
        g = -torch.logsumexp(logits + f.unsqueeze(-1), -2)
    unrolled = torch.exp(logits + f.unsqueeze(-1) + g.unsqueeze(-2))
    (ref,) = torch.autograd.grad((unrolled * weight).sum(), logits)
    assert torch.allclose(ours, ref, atol=1e-9)


@pytest.mark.parametrize("scale", [1.0, 50.0])
@pytest.mark.parametrize("kernel", ["torch", "numba"])
def test_sinkhorn_gradient_finite_and_flows(scale, kernel):
    torch.manual_seed(4)
    logits = (torch.randn(500, 4, 4) * scale).requires_grad_()
    p = sinkhorn_knopp(logits, kernel=kernel)
    p[..., 0, :].square().sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(1, 4, 4), (6, 4, 4)])
@pytest.mark.parametrize("kernel", ["torch", "numba"])
def test_sinkhorn_leaves_its_input_alone(shape, kernel):
    """The projection works in place on a float64 batch-last copy; a float64 input must not be that copy."""
    torch.manual_seed(11)
    logits = torch.randn(*shape, dtype=torch.float64) * 3
    before = logits.clone()
    sinkhorn_knopp(logits, kernel=kernel)
    assert torch.equal(logits, before)


def test_gauss_jordan_solve_matches_linalg_solve():
    """The batch-last solver behind Newton and the backward, on Laplacian-like SPD systems."""
    from stlib.adapters.mhc import _laplacian_system, _solve

    torch.manual_seed(13)
    p = torch.softmax(torch.randn(4, 4, 50, dtype=torch.float64) * 3, dim=1)  # row-stochastic, batch-last
    h, rhs = _laplacian_system(p), torch.randn(4, 50, dtype=torch.float64)
    ref = torch.linalg.solve(h.permute(2, 0, 1), rhs.T.unsqueeze(-1)).squeeze(-1).T
    torch.testing.assert_close(_solve(h, rhs), ref, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("kernel", ["torch", "numba"])
def test_sinkhorn_gradient_matches_finite_differences(kernel):
    torch.manual_seed(5)
    logits = (torch.randn(3, 3, 3, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sinkhorn_knopp(x, n_iters=200, tol=1e-13, kernel=kernel), (logits,))


@pytest.mark.parametrize("kernel", ["torch", "numba"])
def test_sinkhorn_zero_tol_is_the_fixed_iteration_of_the_paper(kernel):
    """tol = 0: exactly n_iters column-then-row sweeps (Eq. 9) after the first row normalisation; no early exit, no
    Newton. (Logits are first shifted to max 0 per row, then per column, which only rescales the start.)"""
    torch.manual_seed(6)
    logits = torch.randn(50, 4, 4, dtype=torch.float64) * 10
    shifted = logits - logits.amax(-1, keepdim=True)
    m = (shifted - shifted.amax(-2, keepdim=True)).softmax(-1)
    for _ in range(7):
        m = m / m.sum(-2, keepdim=True)
        m = m / m.sum(-1, keepdim=True)
    p = sinkhorn_knopp(logits, n_iters=7, tol=0.0, kernel=kernel)
    torch.testing.assert_close(p, m, atol=1e-12, rtol=1e-9)
    assert ds_error(p) > 1e-3  # 7 sweeps at scale 10 are far from converged: no Newton ran


def test_sinkhorn_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        sinkhorn_knopp(torch.zeros(2, 3, 4))


# ------------------------------------------------------------------------------------------- module


@pytest.mark.parametrize("k", [2, 3, 4])
def test_identity_at_init_within_1e5(k):
    plain, wrapped = toy_pair(n_streams=k)
    x = torch.randn(3, 7, 16)
    assert wrapped.transformer_backbone.hyper_connections is not None
    torch.testing.assert_close(wrapped(x), plain(x), atol=1e-5, rtol=0)


def reference_coefficients(mhc: ManifoldHyperConnections, x: torch.Tensor, index: int):
    """Eq. 7-8 in plain autograd ops: streams [N, K, D] -> H_pre [N, K], H_post [N, K], H_res [N, K, K]."""
    n, k, d = x.shape
    flat = x.reshape(n, k * d)
    normed = flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + mhc.eps)  # RMSNorm(vec(X)), no weight
    coef = mhc.bias[index] + mhc.alpha[index][mhc.group] * (normed @ mhc.phi[index])  # [N, M]
    pre, post = torch.sigmoid(coef[:, :k]), 2 * torch.sigmoid(coef[:, k : 2 * k])
    res = sinkhorn_knopp(coef[:, 2 * k :].reshape(n, k, k), mhc.sinkhorn_iters, mhc.sinkhorn_tol, kernel="torch")
    return pre, post, res


def eager_streams(mhc: ManifoldHyperConnections, h: torch.Tensor, branches) -> torch.Tensor:
    """The paper's update (Eq. 3) in plain autograd ops: the reference for both kernels' fused nodes."""
    b, s, d = h.shape
    x = h.reshape(b * s, 1, d).expand(-1, mhc.n_streams, -1)
    for index, branch in enumerate(branches):
        pre, post, res = reference_coefficients(mhc, x, index)
        y = branch((pre.unsqueeze(1) @ x).view(b, s, d)).reshape(b * s, 1, d)
        x = res @ x + post.unsqueeze(-1) * y
    return x.view(b, s, mhc.n_streams, d)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_static_coefficients_at_init(k):
    """H_pre sums to 1 (staggered), H_post = 1, H_res doubly stochastic; dynamic part exactly zero."""
    mhc = ManifoldHyperConnections(dim=8, n_branches=5, n_streams=k)
    x = torch.randn(6, k, 8)
    for index in range(5):
        pre, post, res = reference_coefficients(mhc, x, index)
        torch.testing.assert_close(pre.sum(-1), torch.ones(6))
        assert pre[:, index % k].min() > pre.sum(-1).max() / k  # branch l leans on stream l mod K
        torch.testing.assert_close(post, torch.ones(6, k))
        assert ds_error(res) < 1e-6
        assert torch.allclose(res, res[:1].expand_as(res))  # same for every token: phi = 0


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("kernel", ["torch", "numba"])
def test_fused_branch_read_matches_eager_autograd(kernel, k):
    """Forward and every gradient (x, phi, alpha, bias) of the hand-written backward == autograd, float64, trained state."""
    torch.manual_seed(12)
    backbone = ToyBackbone().double()
    mhc = ManifoldHyperConnections(16, 4, n_streams=k, sinkhorn_tol=1e-12, kernel=kernel).double()
    with torch.no_grad():  # token-dependent coefficients and an unbalanced static part: every path does work
        mhc.phi.normal_(0, 0.2)
        mhc.alpha.uniform_(0.5, 1.5)
        mhc.bias.add_(torch.randn_like(mhc.bias))
    branches = backbone.branches()
    h = torch.randn(2, 5, 16, dtype=torch.float64)
    weight = torch.randn(2, 5, k, 16, dtype=torch.float64)
    grads = []
    for run in (mhc.streams, lambda x, fs: eager_streams(mhc, x, fs)):
        x = h.clone().requires_grad_()
        out = run(x, branches)
        grads.append([out, *torch.autograd.grad((out * weight).sum(), [x, mhc.phi, mhc.alpha, mhc.bias])])
    for name, ours, ref in zip(["out", "x", "phi", "alpha", "bias"], *grads):
        torch.testing.assert_close(ours, ref, atol=1e-9, rtol=1e-7, msg=f"{name} differs")


@pytest.mark.parametrize("k", [3, 4])
def test_numba_and_torch_kernels_agree_in_float32(k):
    """The default CPU path (numba) and the torch path give the same outputs and gradients at float32 precision."""
    torch.manual_seed(3)
    backbone = ToyBackbone(d=32)
    branches = backbone.branches()
    h = torch.randn(3, 7, 32)
    results = []
    for kernel in ("torch", "numba"):
        torch.manual_seed(4)
        mhc = ManifoldHyperConnections(32, 4, n_streams=k, kernel=kernel)
        with torch.no_grad():
            mhc.phi.normal_(0, 0.3)
            mhc.alpha.fill_(1.0)
        x = h.clone().requires_grad_()
        out = mhc(x, branches)
        results.append([out, *torch.autograd.grad(out.square().sum(), [x, mhc.phi, mhc.alpha, mhc.bias])])
    for name, a, b in zip(["out", "x", "phi", "alpha", "bias"], *results):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"{name} differs between kernels")


@pytest.mark.parametrize("scale", [1.0, 10.0, 50.0])
def test_numba_projection_matches_torch_projection(scale):
    """Both projections land on the same doubly-stochastic matrix (it is unique) within their tolerance."""
    torch.manual_seed(int(scale))
    logits = torch.randn(300, 4, 4, dtype=torch.float64) * scale
    ours = sinkhorn_knopp(logits, tol=1e-9, kernel="numba")
    assert ds_error(ours) < 1e-8
    torch.testing.assert_close(ours, sinkhorn_knopp(logits, tol=1e-9, kernel="torch"), atol=1e-6, rtol=0)


def test_kernel_choice_is_checked():
    assert KERNELS == MHC_KERNELS  # the config offers exactly the registered kernels
    with pytest.raises(MHCError, match="kernel must be one of"):
        ManifoldHyperConnections(8, 2, kernel="cuda")
    mhc = ManifoldHyperConnections(8, 2, kernel="numba").to(torch.bfloat16)
    with pytest.raises(MHCError, match="numba.*float32/float64"):
        mhc(torch.randn(1, 3, 8, dtype=torch.bfloat16), [lambda x: x, lambda x: x])
    with pytest.raises(ConfigError, match="mhc.kernel"):
        MHCConfig(kernel="fast")


def test_training_moves_params_and_outputs():
    """After a few optimizer steps every mHC parameter has changed and the output differs from the plain model."""
    plain, wrapped = toy_pair(seed=5)
    mhc = wrapped.transformer_backbone.hyper_connections
    before = {name: p.detach().clone() for name, p in mhc.named_parameters()}
    assert all(p.requires_grad for p in mhc.parameters())
    opt = torch.optim.Adam(mhc.parameters(), lr=1e-2)
    x, target = torch.randn(4, 6, 16), torch.randn(4, 6, 3)
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(wrapped(x), target).backward()
        opt.step()
    for name, p in mhc.named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"
    assert (wrapped(x) - plain(x)).abs().max() > 1e-4
    assert mhc.stability_stats()["h_res_max_error"] < 1e-5


def test_uniform_pre_init_would_keep_streams_identical():
    """Why H_pre is staggered: with uniform static weights, every stream gets the same gradient forever."""

    def stream_spread(stagger: float) -> float:
        torch.manual_seed(6)
        backbone = MHCBackbone(ToyBackbone(), ManifoldHyperConnections(16, 4, n_streams=4, pre_stagger=stagger))
        mhc = backbone.hyper_connections
        opt = torch.optim.SGD(mhc.parameters(), lr=0.5)  # SGD: Adam would blow rounding noise up to full steps
        x = torch.randn(2, 5, 16)
        for _ in range(3):
            opt.zero_grad()
            backbone(x).sum().backward()
            opt.step()
        streams = mhc.streams(x, backbone.branches())
        return (streams - streams[:, :, :1]).abs().max().item()

    assert stream_spread(0.0) < 1e-5  # rounding noise only
    assert stream_spread(0.25) > 1e-3


def test_stability_stats_at_init():
    _, wrapped = toy_pair(seed=7)
    mhc = wrapped.transformer_backbone.hyper_connections
    with pytest.raises(MHCError, match="forward"):
        mhc.stability_stats()
    wrapped(torch.randn(2, 5, 16))
    stats = mhc.stability_stats()
    assert set(stats) == {"amax_gain_forward", "amax_gain_backward", "h_res_max_error"}
    assert stats["amax_gain_forward"] == pytest.approx(1.0, abs=1e-5)
    assert stats["amax_gain_backward"] == pytest.approx(1.0, abs=1e-5)
    assert stats["h_res_max_error"] < 1e-5


def test_forward_backward_shapes():
    _, wrapped = toy_pair(seed=8)
    x = torch.randn(2, 9, 16, requires_grad=True)
    out = wrapped(x)
    assert out.shape == (2, 9, 3)
    out.sum().backward()
    assert x.grad.shape == x.shape
    mhc = wrapped.transformer_backbone.hyper_connections
    assert mhc.phi.grad.shape == (4, 4 * 16, 2 * 4 + 16)
    assert mhc.phi.grad.abs().sum() > 0
    assert torch.isfinite(mhc.phi.grad).all()


def test_one_stream_leaves_model_plain():
    plain, wrapped = toy_pair(seed=9, n_streams=1)
    assert type(wrapped.transformer_backbone) is ToyBackbone
    x = torch.randn(2, 4, 16)
    assert torch.equal(wrapped(x), plain(x))


def test_wrapper_reuses_the_plain_modules_and_keeps_their_keys(tmp_path):
    """mHC backbone = the plain backbone's own children + hyper_connections; state dicts round-trip strictly."""
    torch.manual_seed(14)
    model = ToyModel()
    plain_backbone, plain_keys = model.transformer_backbone, set(model.state_dict())
    apply_mhc(model, MHCConfig(n_streams=3))
    backbone = model.transformer_backbone
    assert isinstance(backbone, MHCBackbone) and backbone.layers is plain_backbone.layers
    assert backbone.norm is plain_backbone.norm
    keys = set(model.state_dict())
    assert keys - plain_keys == {f"transformer_backbone.hyper_connections.{n}" for n in ("phi", "alpha", "bias")}
    assert plain_keys <= keys
    with torch.no_grad():
        backbone.hyper_connections.phi.normal_()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch.manual_seed(15)
    fresh = apply_mhc(ToyModel(), MHCConfig(n_streams=3))
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt"), strict=True)
    x = torch.randn(2, 4, 16)
    torch.testing.assert_close(fresh(x), model(x))
    bare = apply_mhc(ToyBackbone(), MHCConfig(n_streams=2))  # a bare backbone comes back wrapped
    assert isinstance(bare, MHCBackbone) and bare(x).shape == x.shape


def test_apply_mhc_errors_name_what_is_missing():
    with pytest.raises(MHCError, match="layers"):
        apply_mhc(nn.Linear(4, 4), MHCConfig())
    _, wrapped = toy_pair()
    with pytest.raises(MHCError, match="already"):
        apply_mhc(wrapped, MHCConfig())
    mhc = wrapped.transformer_backbone.hyper_connections
    with pytest.raises(MHCError, match="branches"):
        mhc(torch.randn(1, 2, 16), [lambda t: t])


def test_state_transition_model_identity_at_init():
    models = pytest.importorskip("stlib.models")
    from stlib.config import load_config

    cfg = load_config(
        overrides=["model.hidden_dim=32", "model.n_layers=2", "model.n_heads=4", "model.intermediate_size=64"]
    ).model
    torch.manual_seed(10)
    plain = models.StateTransitionModel(cfg, input_dim=12, pert_dim=5).eval()
    wrapped = models.StateTransitionModel(cfg, input_dim=12, pert_dim=5).eval()
    wrapped.load_state_dict(plain.state_dict())
    apply_mhc(wrapped, MHCConfig(n_streams=4))
    assert wrapped.transformer_backbone.hyper_connections is not None
    basal, pert = torch.randn(2, 8, 12), torch.eye(5)[torch.randint(0, 5, (2, 8))]
    out_plain, out_wrapped = plain(basal, pert), wrapped(basal, pert)
    torch.testing.assert_close(out_wrapped["pred"], out_plain["pred"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("stream_dtype", [torch.float32, torch.bfloat16])  # autocast encoders hand over bf16
@pytest.mark.parametrize("kernel", ["torch", "numba"])
def test_trains_under_bf16_autocast_like_fp32(kernel, stream_dtype):
    """training.precision=bf16-mixed: the branches run in bf16, mHC's coefficient path stays in float32.

    Found on a GPU: the branch read's saved stream was float32 while autocast made its outputs bf16, and the
    backward's first product failed ("expected scalar type BFloat16 but found Float"). CPU autocast shows the same.
    """
    torch.manual_seed(3)
    backbone = ToyBackbone(d=32)
    branches = backbone.branches()
    h = torch.randn(3, 7, 32)
    mhc = ManifoldHyperConnections(32, 4, n_streams=4, kernel=kernel)
    with torch.no_grad():
        mhc.phi.normal_(0, 0.3)
    results = []
    for autocast in (False, True):
        x = (h.to(stream_dtype) if autocast else h).clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = mhc(x, branches)
            loss = out.float().square().mean()
        results.append([out.float(), *(g.float() for g in torch.autograd.grad(loss, [x, mhc.phi, mhc.alpha,
                                                                                   mhc.bias]))])
        assert out.dtype == torch.float32  # from the first branch read on, the streams are float32
    for name, fp32, bf16 in zip(["out", "x", "phi", "alpha", "bias"], *results):
        assert torch.isfinite(bf16).all(), name
        torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.05, msg=f"{name}: bf16 autocast far from fp32")
