"""Manifold-constrained hyper-connections (mHC) around the residual branches of a pretrained backbone.

Xie et al., "mHC: Manifold-Constrained Hyper-Connections", arXiv 2512.24880 (Eq. 3, 7-9); parent paper
Zhu et al., "Hyper-Connections", arXiv 2409.19606. The residual stream is widened to K copies
("streams"); around every residual branch F (attention or MLP, each with its own pre-norm)

    X <- H_res X + H_post^T F(H_pre X)

with per-token coefficients read from the RMS-normalised flattened streams: one fused matmul per branch
gives all 2K + K^2 dynamic logits, gated by alpha (init small) on top of static biases. H_pre = sigmoid,
H_post = 2 sigmoid, H_res = Sinkhorn-Knopp projection onto doubly-stochastic matrices, so the composite
stream mixing over any depth stays non-expansive.

Fine-tuning a pretrained model needs the wrapped model to *be* the pretrained model at initialisation:
the dynamic part starts at exactly 0 (phi = 0), static H_pre sums to 1 over streams, H_post = 1, and the
streams are reduced by their mean, so identical streams stay identical and the output equals the plain
residual stack. The static H_pre weights are staggered (branch l leans on stream l mod K) so the streams
can drift apart during training; with uniform weights every stream gets the same gradient forever.

One torch implementation, for any K and device: each branch's coefficient path and stream read is one
autograd node (_BranchRead) with a hand-written backward, and Sinkhorn's backward is implicit
differentiation at the solution. On CPU ``kernel="auto"`` runs the same maths in compiled loops
(stlib.adapters.mhc_kernels, numba), which is faster there; docs/decisions.md ("mHC") has the measurements.

Shapes: B sets, S cells per set, N = B*S tokens, D hidden width, K streams, M = 2K + K^2 coefficients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from stlib.adapters import mhc_kernels

if TYPE_CHECKING:  # only for annotations: keeps this module importable without omegaconf (benchmarks/.venv)
    from stlib.config import MHCConfig

# static H_res logits: 0 on the diagonal, this off it. Identity-leaning so streams keep their identity, but not
# more: Sinkhorn converges at a rate ~ sigma_2(H_res)^2 per sweep, which tends to 1 as H_res nears the identity.
RES_OFF_DIAGONAL_LOGIT = -2.0
# static H_pre weight of branch l on stream (l mod K) is 1/K + this; the other K-1 streams share the rest equally
PRE_STAGGER = 0.25
NEWTON_ITERS = 30  # cap on Newton steps for matrices Sinkhorn leaves above tol
_CHECK_EVERY = 5  # Sinkhorn sweeps between convergence checks (each check is a host sync)
_EARLY_CHECKS = (0, 2)  # plus these: already-balanced matrices (mHC at init) stop before any sweep
_RIDGE = 1e-12  # keeps the graph-Laplacian solves regular when a matrix is (numerically) decomposable


class MHCError(ValueError):
    """mHC cannot be applied to this model; the message says what was expected."""


# ------------------------------------------------------------------------------------------- Sinkhorn
# Matrices are stored batch-last, [n, n, N], inside: every op then runs over N contiguous values instead of N
# tiny [n, n] blocks.


def _ds_error(p: torch.Tensor) -> torch.Tensor:
    """Max |row sum - 1|, |column sum - 1| per matrix: [..., n, n] -> [...]."""
    rows = (p.sum(-1) - 1).abs().amax(-1)
    cols = (p.sum(-2) - 1).abs().amax(-1)
    return torch.maximum(rows, cols)


def _laplacian_system(p: torch.Tensor) -> torch.Tensor:
    """Regularised Hessian of the Sinkhorn dual in the column potentials, [n, n, N] -> [n, n, N].

    For row-stochastic P it is diag(c) - P^T P, the graph Laplacian of W = P^T P (c = W 1). Its null
    direction (constants) is fixed by adding 11^T/n; the ridge keeps (numerically) decomposable P, whose
    Laplacian has more null directions, solvable. float64 keeps the cancellation in c_j - W_jj harmless.
    """
    n = p.shape[0]
    h = (1.0 / n) - (p.unsqueeze(2) * p.unsqueeze(1)).sum(0)  # W[j, l] = sum_i P_ij P_il
    h.diagonal(0, 0, 1).add_(p.sum(0).T + _RIDGE)
    return h


def _solve(h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h [n, n, N] symmetric positive definite, b [n, N] -> h^-1 b [n, N] by Gauss-Jordan without pivoting.

    n steps of three batch-wide ops: cheaper than a batched LAPACK call on tiny matrices, and no layout change.
    """
    n = h.shape[0]
    aug = torch.cat([h, b.unsqueeze(1)], 1)  # [n, n + 1, N]
    for k in range(n):
        row = aug[k] / aug[k, k]
        aug.sub_(aug[:, k : k + 1] * row)  # the product is materialised before sub_, so no aliasing
        aug[k] = row
    return aug[:, n]


def _sweeps(m: torch.Tensor, n_iters: int, tol: float) -> bool:
    """Exp-domain Sinkhorn on row-stochastic m [n, n, N] (columns then rows, in place); True if all converged.

    A sweep starts with the column sums, so a convergence check there costs no extra reduction; checks
    (host syncs) run before the first sweep, after sweep 2 and every _CHECK_EVERY sweeps; none for tol <= 0.
    """
    for i in range(n_iters):
        c = m.sum(0)
        if tol > 0 and (i in _EARLY_CHECKS or i % _CHECK_EVERY == 0) and (c - 1).abs().max().item() < tol:
            return True
        m.div_(c)
        m.div_(m.sum(1, keepdim=True))
    return False


def _dual(p: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """psi(d) = sum_i log sum_j P_ij e^{d_j} - sum_j d_j for column steps d [..., n, N]; convex, psi(0) = 0."""
    return (p * d.exp().unsqueeze(-3)).sum(-2).log().sum(-2) - d.sum(-2)


def _newton(m: torch.Tensor, n_iters: int, tol: float) -> torch.Tensor:
    """Damped Newton on the column potentials of row-stochastic m [n, n, N] that Sinkhorn has not balanced.

    Near-permutation (and strongly identity-leaning) matrices couple blocks of rows/columns only through
    small entries; Sinkhorn then converges at a rate ~ 1 - (coupling), Newton moves whole blocks at once.
    Each matrix takes the full step when it decreases the convex dual psi (the quadratic phase), otherwise
    the best of a few relative and absolute step lengths (never one that increases psi).
    """
    dt, dev = m.dtype, m.device
    fractions = torch.tensor([0.0, 0.5, 0.25, 0.125], dtype=dt, device=dev)
    lengths = 2.0 ** torch.arange(-2, 9, dtype=dt, device=dev)  # along d / max|d|
    for _ in range(n_iters):
        c = m.sum(0)
        if (c - 1).abs().max().item() < tol:
            break
        d = _solve(_laplacian_system(m), 1 - c)  # [n, N]
        psi = _dual(m, d)
        if psi.max().item() > 0:
            size = d.abs().amax(0).clamp_min(1e-300)  # [N]
            t = torch.cat([fractions[:, None].expand(-1, d.shape[1]), lengths[:, None] / size])  # [T, N]
            steps = t.clamp_max(300.0 / size).unsqueeze(1) * d  # [T, n, N]; exp stays finite in float64
            best = steps.gather(0, _dual(m, steps).argmin(0)[None, None].expand(1, d.shape[0], -1))[0]
            d = torch.where(psi > 0, best, d)
        m = m * d.exp()
        m.div_(m.sum(1, keepdim=True))
        m.div_(m.sum(0))
        m.div_(m.sum(1, keepdim=True))
    return m


def _batch_last(logits: torch.Tensor) -> torch.Tensor:
    """[N, n, n] -> a fresh contiguous float64 [n, n, N] (a copy even when no cast is needed: _project writes in place)."""
    return logits.permute(1, 2, 0).to(torch.float64, memory_format=torch.contiguous_format, copy=True)


def _project(x: torch.Tensor, n_iters: int, tol: float, newton_iters: int) -> torch.Tensor:
    """Logits [n, n, N] float64 (overwritten) -> row-stochastic, column sums within tol, [n, n, N]; no autograd.

    tol <= 0: exactly n_iters sweeps (the paper's Eq. 9, no host sync), no Newton.
    """
    # rows, then columns, shifted to max 0: after exp each holds an exact 1, so none underflows to 0
    x.sub_(x.amax(1, keepdim=True))
    m = x.sub_(x.amax(0)).exp_()
    if not _sweeps(m.div_(m.sum(1, keepdim=True)), n_iters, tol) and tol > 0 and newton_iters > 0:
        bad = (m.sum(0) - 1).abs().amax(0) >= tol
        if bad.any():
            idx = bad.nonzero().squeeze(1)
            m[:, :, idx] = _newton(m[:, :, idx], newton_iters, tol)
    return m


def _project_backward(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Implicit differentiation at the solution: p, upstream g [n, n, N] float64 -> gradient of the logits.

    For P = diag(e^f) exp(L) diag(e^g) doubly stochastic and upstream gradient G, dL = P * (G - a 1^T - 1 b^T)
    with a + P b = (P*G) 1 and P^T a + b = (P*G)^T 1; eliminating a gives the Laplacian system
    (I - P^T P) b = (P*G)^T 1 - P^T (P*G) 1. One small solve replaces backprop through every sweep.
    """
    q = p * g
    q_rows = q.sum(1)  # [n, N]
    rhs = q.sum(0) - (p * q_rows.unsqueeze(1)).sum(0)
    b = _solve(_laplacian_system(p), rhs)
    a = q_rows - (p * b).sum(1)
    return p * (g - a.unsqueeze(1) - b)


class _SinkhornKnopp(torch.autograd.Function):
    """Forward: the projection without a graph. Backward: implicit differentiation (_project_backward)."""

    @staticmethod
    def forward(ctx, logits, n_iters, tol, newton_iters):
        shape = logits.shape
        p = _project(_batch_last(logits.detach().reshape(-1, shape[-2], shape[-1])), n_iters, tol, newton_iters)
        ctx.save_for_backward(p)
        return p.permute(2, 0, 1).to(logits.dtype).reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        (p,) = ctx.saved_tensors
        dl = _project_backward(p, _batch_last(grad.reshape(-1, *p.shape[:2])))
        return dl.permute(2, 0, 1).to(grad.dtype).reshape(grad.shape), None, None, None


# ------------------------------------------------------------------------------------------- branch read / write


class _BranchRead(torch.autograd.Function):
    """One node for a branch's whole coefficient path and stream read; hand-written backward.

    x [N, K, D] -> branch input H_pre x [N, D], mixed streams H_res x [N, K, D], H_post [N, K], H_res [N, K, K]
    (no gradient; for stability_stats). c = bias + gate * (x phi) / rms(x); H_pre = sigmoid(c_pre), H_post =
    2 sigmoid(c_post), H_res = Sinkhorn(c_res). The forward is one matmul, one batched [H_pre; H_res] x product
    and the projection; the backward two matmuls, two batched products and one Laplacian solve.

    It runs with autocast off, in the streams' dtype: under bf16-mixed its products would come out bf16 while
    the stream it saves stays float32, and the hand-written backward cannot mix the two. The branches
    themselves still run under autocast.
    """

    @staticmethod
    def forward(ctx, x, phi, bias, alpha, group, n_iters, tol, newton_iters, eps):
        with torch.autocast(x.device.type, enabled=False):  # see the class docstring
            n, k, d = x.shape
            flat = x.reshape(n, k * d)
            t = flat @ phi  # [N, M]
            r = torch.rsqrt(torch.linalg.vector_norm(flat, dim=-1, keepdim=True).square_().div_(k * d).add_(eps))
            gate = alpha[group]
            u = t * r
            c = torch.addcmul(bias, u, gate)
            gates = torch.sigmoid(c[:, : 2 * k])
            p = _project(_batch_last(c[:, 2 * k :].reshape(n, k, k)), n_iters, tol, newton_iters)  # [K, K, N] f64
            a = torch.cat([gates[:, None, :k], p.permute(2, 0, 1).to(x.dtype)], 1)  # [N, K+1, K]: [H_pre; H_res]
            z = a @ x  # [N, K+1, D]
        ctx.save_for_backward(x, phi, t, r, u, gate, gates, a, p)
        ctx.group = group
        res = a[:, 1:]
        ctx.mark_non_differentiable(res)
        return z[:, 0], z[:, 1:], 2 * gates[:, k:], res

    @staticmethod
    def backward(ctx, g_inp, g_mixed, g_post, _):
        x, phi, t, r, u, gate, gates, a, p = ctx.saved_tensors
        n, k, d = x.shape
        g_z = torch.cat([g_inp.unsqueeze(1), g_mixed], 1)  # [N, K+1, D]
        g_a = g_z @ x.transpose(1, 2)  # [N, K+1, K]
        g_x = a.transpose(1, 2) @ g_z  # [N, K, D]
        sig_grad = gates * (1 - gates)  # sigmoid' for pre and post
        g_res = _project_backward(p, _batch_last(g_a[:, 1:]))  # [K, K, N] f64
        g_c = torch.cat(
            [
                g_a[:, 0] * sig_grad[:, :k],
                2 * g_post * sig_grad[:, k:],
                g_res.permute(2, 0, 1).reshape(n, k * k).to(x.dtype),
            ],
            1,
        )  # [N, M]
        g_bias = g_c.sum(0)
        g_alpha = torch.zeros(3, dtype=x.dtype, device=x.device).index_add_(0, ctx.group, (g_c * u).sum(0))
        g_u = g_c * gate
        g_t = g_u * r
        flat = x.reshape(n, k * d)
        g_phi = (g_t.T @ flat).T  # [K*D, M]; this orientation is the faster matmul on CPU
        # r = (|flat|^2 / KD + eps)^(-1/2): dr/dflat = -r^3 flat / KD; both terms accumulate in place
        scale = (g_u * t).sum(-1, keepdim=True) * r.pow(3) / (-k * d)
        g_x.view(n, k * d).addmm_(g_t, phi.T).addcmul_(flat, scale)
        return g_x, g_phi, g_bias, g_alpha, None, None, None, None, None


def _stream_write(mixed: torch.Tensor, post: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """X <- H_res X + H_post^T y from mixed [N, K, D], post [N, K], y [N, D] (promoted to the streams' dtype)."""
    return torch.addcmul(mixed, post.unsqueeze(-1), y.unsqueeze(1))


@dataclass(frozen=True)
class _Kernel:
    """One implementation of mHC's per-token work: branch read, stream write, Sinkhorn projection (same signatures)."""

    read: Callable
    write: Callable
    project: Callable


_KERNELS = {
    "numba": _Kernel(mhc_kernels.branch_read, mhc_kernels.stream_write, mhc_kernels.project),
    "torch": _Kernel(_BranchRead.apply, _stream_write, _SinkhornKnopp.apply),
}
KERNELS = ("auto", *_KERNELS)  # auto: numba where it fits (CPU float32/float64), torch elsewhere


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise MHCError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def _kernel(choice: str, device: torch.device, dtype: torch.dtype) -> _Kernel:
    fits = mhc_kernels.fits(device, dtype)
    if choice == "numba" and not fits:
        raise MHCError(f"mHC kernel 'numba' needs numba and a CPU float32/float64 tensor; got {dtype} on "
                       f"{device.type}{'' if mhc_kernels.AVAILABLE else ' (numba is not installed)'}")
    return _KERNELS["numba" if fits and choice != "torch" else "torch"]


def sinkhorn_knopp(
    logits: torch.Tensor, n_iters: int = 20, tol: float = 1e-6, newton_iters: int = NEWTON_ITERS,
    kernel: str = "auto",
) -> torch.Tensor:
    """Project logits [..., n, n] onto doubly-stochastic matrices (Sinkhorn-Knopp of exp(logits)).

    Computed in float64 whatever the input dtype (bf16/fp16/fp32 in -> same dtype out). Up to n_iters
    Sinkhorn sweeps with an early exit once all row and column sums are within tol; matrices still above
    tol (near-permutations, where Sinkhorn needs thousands of sweeps) get up to newton_iters Newton steps;
    tol <= 0 runs exactly n_iters sweeps. No clamping or temperature: the result is the projection of the
    given logits. Differentiable (implicit differentiation, exact for the converged projection).
    """
    _check_kernel(kernel)
    if logits.shape[-1] != logits.shape[-2] or logits.dim() < 2:
        raise ValueError(f"sinkhorn_knopp expects square matrices [..., n, n], got shape {tuple(logits.shape)}")
    if not torch.is_floating_point(logits):
        raise ValueError(f"sinkhorn_knopp expects floating-point logits, got {logits.dtype}")
    if logits.numel() == 0:
        return logits.clone()
    project = _kernel(kernel, logits.device, torch.float64).project  # the projection is float64 for any input
    return project(logits, n_iters, tol, newton_iters)


# ------------------------------------------------------------------------------------------- module


class ManifoldHyperConnections(nn.Module):
    """K residual streams with mHC mixing around every branch; identity with the plain stack at init.

    Parameters are stacked over branches: phi [L, K*D, M] (zero-init), alpha [L, 3] gates for the
    pre/post/res groups (init alpha_init), bias [L, M] static logits.
    """

    def __init__(
        self,
        dim: int,
        n_branches: int,
        n_streams: int = 4,
        sinkhorn_iters: int = 20,
        sinkhorn_tol: float = 1e-6,
        alpha_init: float = 0.01,
        eps: float = 1e-6,
        pre_stagger: float = PRE_STAGGER,
        kernel: str = "auto",
    ):
        super().__init__()
        if n_streams < 1 or n_branches < 1 or dim < 1:
            raise MHCError(f"need dim, n_branches, n_streams >= 1; got {dim}, {n_branches}, {n_streams}")
        _check_kernel(kernel)
        k = n_streams
        if k > 1 and not 0 <= pre_stagger < 1 - 1 / k:
            raise MHCError(f"pre_stagger must be in [0, 1 - 1/K) = [0, {1 - 1 / k:.3g}), got {pre_stagger}")
        self.dim, self.n_branches, self.n_streams = dim, n_branches, k
        self.sinkhorn_iters, self.sinkhorn_tol, self.eps = sinkhorn_iters, sinkhorn_tol, eps
        self.kernel = kernel
        n_coef = 2 * k + k * k
        self.phi = nn.Parameter(torch.zeros(n_branches, k * dim, n_coef))
        self.alpha = nn.Parameter(torch.full((n_branches, 3), float(alpha_init)))
        self.bias = nn.Parameter(self._static_bias(n_branches, k, pre_stagger))
        self.register_buffer("group", torch.tensor([0] * k + [1] * k + [2] * k * k), persistent=False)
        self._last_res: list[torch.Tensor] = []

    @staticmethod
    def _static_bias(n_branches: int, k: int, stagger: float) -> torch.Tensor:
        """sigmoid(b_pre) sums to 1 over streams (staggered), 2 sigmoid(b_post) = 1, b_res identity-leaning.

        stagger = 0 gives the uniform H_pre = 1/K (every stream then gets the same gradient forever); K = 1
        reads its one stream with weight ~1.
        """
        if k == 1:
            pre = torch.full((n_branches, 1), 20.0)
        else:
            primary = 1.0 / k + stagger
            weights = torch.full((n_branches, k), (1.0 - primary) / (k - 1))
            weights[torch.arange(n_branches), torch.arange(n_branches) % k] = primary
            pre = torch.logit(weights)
        post = torch.zeros(n_branches, k)
        res = RES_OFF_DIAGONAL_LOGIT * (1 - torch.eye(k)).reshape(1, k * k).expand(n_branches, -1)
        return torch.cat([pre, post, res], dim=1)

    def forward(self, h: torch.Tensor, branches: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
        """h [B, S, D], one callable per branch ([B, S, D] -> [B, S, D]) -> [B, S, D] (mean of the streams)."""
        return self.streams(h, branches).mean(2)

    def streams(self, h: torch.Tensor, branches: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
        """The K streams after the last branch, [B, S, K, D], before the reduction."""
        if len(branches) != self.n_branches:
            raise MHCError(f"ManifoldHyperConnections was built for {self.n_branches} branches, got {len(branches)}")
        b, s, d = h.shape
        if d != self.dim:
            raise MHCError(f"ManifoldHyperConnections was built for hidden size {self.dim}, got input width {d}")
        n, k = b * s, self.n_streams
        # K identical copies in the coefficients' dtype: under bf16 autocast the encoders hand over bf16, and the
        # streams are the residual path that mixed precision keeps in float32
        x = h.reshape(n, 1, d).expand(n, k, d).to(self.phi.dtype).contiguous()
        kernel = _kernel(self.kernel, x.device, x.dtype)
        args = (self.group, self.sinkhorn_iters, self.sinkhorn_tol, NEWTON_ITERS, self.eps)
        self._last_res = []
        for index, branch in enumerate(branches):
            inp, mixed, post, res = kernel.read(x, self.phi[index], self.bias[index], self.alpha[index], *args)
            y = branch(inp.view(b, s, d)).reshape(n, d)  # F(H_pre X)
            x = kernel.write(mixed, post, y)  # X <- H_res X + H_post^T y
            self._last_res.append(res)
        return x.view(b, s, k, d)

    @torch.no_grad()
    def stability_stats(self) -> dict[str, float]:
        """Composite Amax gains of the last forward (mHC paper Fig. 3 quantities) and H_res's DS error.

        The composite is prod_l mean_tokens(H_res^l) over depth (a token-mean per branch: the mean of
        doubly-stochastic matrices is doubly stochastic, so this is what the bound is about). Forward gain =
        max |row sum|, backward = max |column sum|; both are 1 for exact doubly-stochastic mixing.
        """
        if not self._last_res:
            raise MHCError("stability_stats() needs a forward pass first")
        composite = torch.eye(self.n_streams, dtype=torch.float64, device=self._last_res[0].device)
        error = 0.0
        for res in self._last_res:
            res64 = res.to(torch.float64)
            composite = res64.mean(0) @ composite
            error = max(error, _ds_error(res64).max().item())
        return {
            "amax_gain_forward": composite.abs().sum(-1).max().item(),
            "amax_gain_backward": composite.abs().sum(-2).max().item(),
            "h_res_max_error": error,
        }

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, n_branches={self.n_branches}, n_streams={self.n_streams}, "
            f"sinkhorn_iters={self.sinkhorn_iters}, sinkhorn_tol={self.sinkhorn_tol}, kernel={self.kernel}"
        )


# ------------------------------------------------------------------------------------------- applying


class MHCBackbone(nn.Module):
    """A plain pre-norm residual backbone (``layers`` with ``attn_branch``/``mlp_branch``, a final ``norm``) with
    its residual sums replaced by mHC.

    It takes over the plain backbone's children, parameters and buffers under their own names and adds
    ``hyper_connections``: state-dict keys are the plain ones beside ``hyper_connections.*``, and the plain
    module itself never knows about mHC.
    """

    def __init__(self, plain: nn.Module, hyper_connections: ManifoldHyperConnections):
        super().__init__()
        for name, child in plain.named_children():
            self.add_module(name, child)
        for name, param in plain.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in plain.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in plain._non_persistent_buffers_set)
        self.hyper_connections = hyper_connections
        self.train(plain.training)

    def branches(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """Residual branches in depth order: attn_0, mlp_0, attn_1, mlp_1, ..."""
        return [f for layer in self.layers for f in (layer.attn_branch, layer.mlp_branch)]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[B, S, D] -> [B, S, D]."""
        return self.norm(self.hyper_connections(h, self.branches()))


def apply_mhc(model: nn.Module, mhc_cfg: MHCConfig) -> nn.Module:
    """Wrap the backbone's residual branches with mHC (new parameters trainable); n_streams=1 is a no-op.

    ``model.transformer_backbone`` becomes an :class:`MHCBackbone` around it; a bare backbone (no
    ``transformer_backbone``) is returned wrapped.
    """
    backbone = getattr(model, "transformer_backbone", model)
    if isinstance(backbone, MHCBackbone):
        raise MHCError("apply_mhc: this backbone already has hyper_connections; apply mHC once")
    missing = [name for name in ("layers", "norm") if not hasattr(backbone, name)]
    if missing:
        raise MHCError(f"apply_mhc needs `model.transformer_backbone` (or a backbone) with `layers` and `norm`; "
                       f"{type(backbone).__name__} lacks {', '.join(missing)}")
    if mhc_cfg.n_streams == 1:
        return model
    reference = next(backbone.parameters())
    module = ManifoldHyperConnections(
        dim=int(backbone.norm.weight.shape[-1]),
        n_branches=2 * len(backbone.layers),
        n_streams=mhc_cfg.n_streams,
        sinkhorn_iters=mhc_cfg.sinkhorn_iters,
        sinkhorn_tol=mhc_cfg.sinkhorn_tol,
        alpha_init=mhc_cfg.alpha_init,
        kernel=mhc_cfg.kernel,
    )
    wrapped = MHCBackbone(backbone, module.to(device=reference.device, dtype=reference.dtype))
    if backbone is model:
        return wrapped
    model.transformer_backbone = wrapped
    return model
