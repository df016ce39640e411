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
can drift apart during training; with uniform weights every stream receives the same gradient forever
and mHC collapses to a gated plain residual.

Speed: each branch's coefficient path and stream read is one autograd node with a hand-written backward.
On CPU (``kernel="auto"``) the per-token work runs in compiled loops (mhc_kernels, numba): ~1.28x a plain
residual stack instead of ~1.65x with eager torch ops (_BranchRead, the GPU path, Sinkhorn on batch-last
[K, K, N] matrices); benchmarks/bench_mhc.py has the measurements and a log of what was tried.

Shapes: B sets, S cells per set, N = B*S tokens, D hidden width, K streams, M = 2K + K^2 coefficients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from stlib.adapters import mhc_kernels

if TYPE_CHECKING:  # only for annotations: keeps this module importable without omegaconf (benchmarks/.venv)
    from stlib.config import MHCConfig

# static H_res logits: 0 on the diagonal, this on the off-diagonal (diag weight 0.71 for K = 4). Identity-
# leaning so streams keep their identity; not more, because Sinkhorn's rate is ~ sigma_2(H_res)^2 per sweep
# (0.38 here; 0.87 at -4, which leaves ~1e-3 errors after 20 sweeps and sends every token to Newton).
RES_OFF_DIAGONAL_LOGIT = -2.0
# static H_pre weight of branch l on stream (l mod K); the other K-1 streams share the rest equally. 1/K would
# be uniform, and then every stream gets the same gradient forever (tests: test_uniform_pre_init...).
PRE_PRIMARY_WEIGHT = 0.5
KERNELS = ("auto", "numba", "torch")  # per-token work: numba's compiled loops on CPU (auto), or eager torch ops
NEWTON_ITERS = 30  # cap on Newton polishing steps for matrices Sinkhorn leaves above tol
_CHECK_EVERY = 5  # Sinkhorn sweeps between convergence checks (each check is a host sync)
_EARLY_CHECKS = (0, 2)  # plus these: already-balanced matrices (mHC at init) stop before any sweep
_RIDGE = 1e-12  # keeps the graph-Laplacian solves regular when a matrix is (numerically) decomposable


class MHCError(ValueError):
    """mHC cannot be applied to this model; the message says what was expected."""


# ------------------------------------------------------------------------------------------- Sinkhorn
# Internally matrices are stored batch-last, [n, n, N]: every op then runs over N contiguous values
# instead of N tiny [n, n] blocks, which makes each reduction/division ~4x cheaper on CPU (measured:
# a column-normalising half sweep on 512 4x4 float64 matrices 43 us batch-first, 10 us batch-last).


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
    """h [n, n, N] symmetric positive definite, b [n, N] -> h^-1 b [n, N] by Gauss-Jordan.

    No pivoting: elimination on SPD matrices is stable without it. n steps of three batch-wide ops beat a
    batched LAPACK call on tiny matrices and need no layout change.
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
    (host syncs) run before the first sweep, after sweep 2 and every _CHECK_EVERY sweeps.
    """
    for i in range(n_iters):
        c = m.sum(0)
        if (i in _EARLY_CHECKS or i % _CHECK_EVERY == 0) and (c - 1).abs().max().item() < tol:
            return True
        m.div_(c)
        m.div_(m.sum(1, keepdim=True))
    return False


def _dual(p: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """psi(d) = sum_i log sum_j P_ij e^{d_j} - sum_j d_j for steps d [..., n, N] (psi(0) = 0), and the row sums."""
    rows = (p * d.exp().unsqueeze(-3)).sum(-2)
    return rows.log().sum(-2) - d.sum(-2), rows


def _newton_polish(m: torch.Tensor, n_iters: int, tol: float) -> torch.Tensor:
    """Damped Newton on the column potentials for row-stochastic m [n, n, N] Sinkhorn has not converged.

    Near-permutation (and strongly identity-leaning) matrices couple blocks of rows/columns only through
    small entries; Sinkhorn then converges at a rate ~ 1 - (coupling). Newton moves whole blocks at once.
    The full step is taken when it decreases the convex dual psi for every matrix (the common, quadratic
    phase); otherwise each matrix takes the best of a few relative and absolute step lengths. Returns
    row-stochastic matrices, columns within tol where reachable in n_iters steps.
    """
    dt, dev = m.dtype, m.device
    rel = torch.tensor([0.0, 1.0, 0.5, 0.25, 0.125], dtype=dt, device=dev)
    absolute = 2.0 ** torch.arange(-2, 9, dtype=dt, device=dev)
    for _ in range(n_iters):
        c = m.sum(0)
        if (c - 1).abs().max().item() < tol:
            break
        d = _solve(_laplacian_system(m), 1 - c)  # [n, N]; sums to 0 like 1 - c (11^T/n keeps 1 an eigenvector)
        psi, rows = _dual(m, d)
        if psi.max().item() > 0:
            d = _line_search(m, d, rel, absolute)
            rows = (m * d.exp()).sum(1)
        m = m * d.exp() / rows.unsqueeze(1)
        m.div_(m.sum(0))
        m.div_(m.sum(1, keepdim=True))
    return m


def _line_search(m: torch.Tensor, d: torch.Tensor, rel: torch.Tensor, absolute: torch.Tensor) -> torch.Tensor:
    """Per matrix, the step among relative (t * d) and absolute (2^k along d / max|d|) candidates minimising psi."""
    size = d.abs().amax(0).clamp_min(1e-300)  # [N]
    t = torch.cat([rel[:, None].expand(-1, d.shape[1]), absolute[:, None] / size])  # [T, N]
    step = t.clamp_max(300.0 / size).unsqueeze(1) * d  # [T, n, N]; exp stays finite in float64
    psi = _dual(m, step)[0]  # [T, N]
    return step.gather(0, psi.argmin(0)[None, None].expand(1, d.shape[0], -1))[0]


def _batch_last(logits: torch.Tensor) -> torch.Tensor:
    """[N, n, n] -> a fresh contiguous float64 [n, n, N] (a copy even when no cast is needed: _project writes in place)."""
    return logits.permute(1, 2, 0).to(torch.float64, memory_format=torch.contiguous_format, copy=True)


def _project(x: torch.Tensor, n_iters: int, tol: float, newton_iters: int) -> torch.Tensor:
    """Logits [n, n, N] float64 (overwritten) -> row-stochastic, column sums within tol, [n, n, N]; no autograd."""
    # shift rows, then columns, to max 0: every row and column then holds an exact 1 after exp, so no
    # row or column underflows to 0 in float64 even for logit ranges of several hundred
    x.sub_(x.amax(1, keepdim=True))
    m = x.sub_(x.amax(0)).exp_()
    if not _sweeps(m.div_(m.sum(1, keepdim=True)), n_iters, tol) and newton_iters > 0:
        bad = (m.sum(0) - 1).abs().amax(0) >= tol
        if bad.any():
            idx = bad.nonzero().squeeze(1)
            m[:, :, idx] = _newton_polish(m[:, :, idx], newton_iters, tol)
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
    """Forward: the projection without a graph. Backward: implicit differentiation (_project_backward).

    With ``compiled`` the same maths runs in mhc_kernels' loops (CPU); p is then saved batch-first [N, n, n].
    """

    @staticmethod
    def forward(ctx, logits, n_iters, tol, newton_iters, compiled):
        shape = logits.shape
        flat = logits.detach().reshape(-1, shape[-2], shape[-1])
        ctx.shape, ctx.compiled = shape, compiled
        if compiled:
            p = torch.from_numpy(mhc_kernels.project(flat.to(torch.float64).contiguous().numpy(), n_iters, tol,
                                                     newton_iters))
            ctx.save_for_backward(p)
            return p.to(logits.dtype).reshape(shape)
        p = _project(_batch_last(flat), n_iters, tol, newton_iters)
        ctx.save_for_backward(p)
        return p.permute(2, 0, 1).to(logits.dtype).reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        (p,) = ctx.saved_tensors
        if ctx.compiled:
            g = grad.reshape(p.shape).to(torch.float64).contiguous()
            dl = torch.from_numpy(mhc_kernels.project_backward(p.numpy(), g.numpy()))
            return dl.to(grad.dtype).reshape(ctx.shape), None, None, None, None
        dl = _project_backward(p, _batch_last(grad.reshape(-1, *p.shape[:2])))  # p: [n, n, N]
        return dl.permute(2, 0, 1).to(grad.dtype).reshape(ctx.shape), None, None, None, None


def sinkhorn_knopp(
    logits: torch.Tensor, n_iters: int = 20, tol: float = 1e-6, newton_iters: int = NEWTON_ITERS,
    kernel: str = "auto",
) -> torch.Tensor:
    """Project logits [..., n, n] onto doubly-stochastic matrices (Sinkhorn-Knopp of exp(logits)).

    Computed in float64 whatever the input dtype (bf16/fp16/fp32 in -> same dtype out). Up to n_iters
    Sinkhorn sweeps with an early exit once all row and column sums are within tol; matrices still above
    tol (near-permutations, where Sinkhorn needs thousands of sweeps) get up to newton_iters Newton steps.
    No clamping or temperature: the result is the projection of the given logits. Differentiable
    (implicit differentiation at the solution, exact for the converged projection). ``kernel``: "auto" runs
    compiled loops (numba) on CPU and torch ops elsewhere; "numba" or "torch" force one.
    """
    _check_kernel(kernel)
    if logits.shape[-1] != logits.shape[-2] or logits.dim() < 2:
        raise ValueError(f"sinkhorn_knopp expects square matrices [..., n, n], got shape {tuple(logits.shape)}")
    if not torch.is_floating_point(logits):
        raise ValueError(f"sinkhorn_knopp expects floating-point logits, got {logits.dtype}")
    if logits.numel() == 0:
        return logits.clone()
    compiled = _use_fused(kernel, logits.device, torch.float64)  # the projection runs in float64 for any input
    return _SinkhornKnopp.apply(logits, n_iters, tol, newton_iters, compiled)


# ------------------------------------------------------------------------------------------- fused branch read


class _BranchRead(torch.autograd.Function):
    """One node for a branch's whole coefficient path and stream read; hand-written backward.

    x [N, K, D] -> branch input H_pre x [N, D], mixed streams H_res x [N, K, D], H_post [N, K], H_res [N, K, K]
    (no gradient; for stability_stats). Same maths as ManifoldHyperConnections.coefficients: c = bias + gate *
    (x phi) / rms(x); H_pre = sigmoid, H_post = 2 sigmoid, H_res = Sinkhorn. The eager graph of those ~25 ops
    costs more than their arithmetic; here the forward is one matmul, one batched [H_pre; H_res] x product and
    the projection, and the backward two matmuls, two batched products and one Laplacian solve.

    It runs with autocast off, in the streams' dtype (the coefficients', see streams()): under bf16-mixed its
    products would come out bf16 while the stream it saves stays float32, and the hand-written backward cannot
    mix the two (it failed on a GPU); coefficients and Sinkhorn want the precision anyway. The branches
    themselves still run under autocast.
    """

    @staticmethod
    def forward(ctx, x, phi, bias, alpha, group, n_iters, tol, newton_iters, eps):
        with torch.autocast(x.device.type, enabled=False):  # see the class docstring
            return _BranchRead._forward(ctx, x, phi, bias, alpha, group, n_iters, tol, newton_iters, eps)

    @staticmethod
    def _forward(ctx, x, phi, bias, alpha, group, n_iters, tol, newton_iters, eps):
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


class _BranchReadFused(torch.autograd.Function):
    """_BranchRead on CPU with the per-token work in compiled loops (mhc_kernels); the dense products stay in torch."""

    @staticmethod
    def forward(ctx, x, phi, bias, alpha, group, n_iters, tol, newton_iters, eps):
        n, k, d = x.shape
        x = x.contiguous()
        flat = x.view(n, k * d)
        with torch.autocast(x.device.type, enabled=False):  # see _BranchRead
            t_rows = torch.mm(phi.T, flat.T)  # (x phi)^T [M, N]: this orientation is the faster matmul on CPU
        gate = alpha[group]
        inp, mixed, gates, p, r = mhc_kernels.branch_read_forward(
            x.detach().numpy(), t_rows.detach().numpy(), bias.detach().numpy(), gate.detach().numpy(),
            eps, n_iters, tol, newton_iters,
        )
        gates, p, r = torch.from_numpy(gates), torch.from_numpy(p), torch.from_numpy(r)
        ctx.save_for_backward(x, phi, t_rows, r, gate, gates, p)
        res = p.to(x.dtype)
        ctx.mark_non_differentiable(res)
        return torch.from_numpy(inp), torch.from_numpy(mixed), 2 * gates[:, k:], res

    @staticmethod
    def backward(ctx, g_inp, g_mixed, g_post, _):
        x, phi, t_rows, r, gate, gates, p = ctx.saved_tensors
        n, k, d = x.shape
        g_x, g_t, g_bias, g_alpha = (torch.from_numpy(a) for a in mhc_kernels.branch_read_backward(
            x.numpy(), t_rows.detach().numpy(), r.numpy(), gate.detach().numpy(), gates.numpy(), p.numpy(),
            g_inp.contiguous().numpy(), g_mixed.contiguous().numpy(), g_post.contiguous().numpy(),
        ))
        flat = x.view(n, k * d)
        g_x.view(n, k * d).addmm_(g_t, phi.detach().T)
        g_phi = (g_t.T @ flat).T  # [K*D, M]; this orientation is the faster matmul on CPU
        return g_x, g_phi, g_bias, g_alpha, None, None, None, None, None


class _StreamWriteFused(torch.autograd.Function):
    """X <- mixed + H_post^T y (x [N, K, D] from mixed [N, K, D], post [N, K], y [N, D]); one-pass CPU loops.

    Written into `mixed` itself (marked dirty): the branch read made it for this and nothing saved it.
    """

    @staticmethod
    def forward(ctx, mixed, post, y):
        y = y.to(mixed.dtype)  # a branch under bf16 autocast returns bf16; the streams stay in their own dtype
        ctx.save_for_backward(post, y)
        # mixed itself (not a contiguous copy) must receive the write; post and y may be copied
        mhc_kernels.stream_write(mixed.detach().numpy(), post.detach().contiguous().numpy(),
                                 y.detach().contiguous().numpy())
        ctx.mark_dirty(mixed)
        return mixed

    @staticmethod
    def backward(ctx, g):
        post, y = ctx.saved_tensors
        g_post, g_y = mhc_kernels.stream_write_backward(
            g.contiguous().numpy(), y.detach().contiguous().numpy(), post.detach().contiguous().numpy()
        )
        return g, torch.from_numpy(g_post), torch.from_numpy(g_y)


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise MHCError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def _use_fused(kernel: str, device: torch.device, dtype: torch.dtype) -> bool:
    """The numba kernels run on CPU float32/float64 data; "auto" picks them there, torch elsewhere."""
    fits = mhc_kernels.AVAILABLE and device.type == "cpu" and dtype in (torch.float32, torch.float64)
    if kernel == "numba" and not fits:
        raise MHCError(f"mHC kernel 'numba' needs numba and a CPU float32/float64 tensor; got {dtype} on "
                       f"{device.type}{'' if mhc_kernels.AVAILABLE else ' (numba is not installed)'}")
    return fits and kernel != "torch"


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
        pre_primary_weight: float = PRE_PRIMARY_WEIGHT,
        kernel: str = "auto",
    ):
        super().__init__()
        if n_streams < 1 or n_branches < 1 or dim < 1:
            raise MHCError(f"need dim, n_branches, n_streams >= 1; got {dim}, {n_branches}, {n_streams}")
        _check_kernel(kernel)
        if not 0 < pre_primary_weight < 1:
            raise MHCError(f"pre_primary_weight must be in (0, 1), got {pre_primary_weight}")
        k = n_streams
        self.dim, self.n_branches, self.n_streams = dim, n_branches, k
        self.sinkhorn_iters, self.sinkhorn_tol, self.eps = sinkhorn_iters, sinkhorn_tol, eps
        self.kernel = kernel
        n_coef = 2 * k + k * k
        self.phi = nn.Parameter(torch.zeros(n_branches, k * dim, n_coef))
        self.alpha = nn.Parameter(torch.full((n_branches, 3), float(alpha_init)))
        self.bias = nn.Parameter(self._static_bias(n_branches, k, pre_primary_weight))
        self.register_buffer("group", torch.tensor([0] * k + [1] * k + [2] * k * k), persistent=False)
        self._last_res: list[torch.Tensor] = []

    @staticmethod
    def _static_bias(n_branches: int, k: int, primary: float) -> torch.Tensor:
        """sigmoid(b_pre) sums to 1 over streams (staggered), 2 sigmoid(b_post) = 1, b_res identity-leaning.

        primary = 1/K gives the uniform H_pre = 1/K; K = 1 reads its one stream with weight ~1.
        """
        primary = primary if k > 1 else 1.0
        rest = (1.0 - primary) / (k - 1) if k > 1 else 0.0
        pre = torch.full((n_branches, k), rest)
        pre[torch.arange(n_branches), torch.arange(n_branches) % k] = primary
        pre = torch.logit(pre.clamp(1e-6, 1 - 1e-6)) if k > 1 else torch.full((n_branches, 1), 20.0)
        post = torch.zeros(n_branches, k)
        res = RES_OFF_DIAGONAL_LOGIT * (1 - torch.eye(k)).reshape(1, k * k).expand(n_branches, -1)
        return torch.cat([pre, post, res], dim=1)

    def coefficients(self, x: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Streams [N, K, D] -> H_pre [N, K], H_post / 2 [N, K], H_res [N, K, K] for branch `index`."""
        n, k, d = x.shape
        flat = x.reshape(n, k * d)
        # RMSNorm(x) phi = (x phi) / rms(x): normalise the [N, M] product, not the [N, K*D] input
        inv_rms = torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + self.eps)
        gate = self.alpha[index][self.group]  # [M]
        coef = torch.addcmul(self.bias[index], (flat @ self.phi[index]) * inv_rms, gate)  # [N, M]
        gates = torch.sigmoid(coef[:, : 2 * k])
        res = sinkhorn_knopp(coef[:, 2 * k :].reshape(n, k, k), self.sinkhorn_iters, self.sinkhorn_tol)
        return gates[:, :k], gates[:, k:], res

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
        # [N, K, D]: K identical copies, in the coefficients' dtype: under bf16 autocast the encoders hand over
        # bf16, and the streams are the residual path that mixed precision keeps in float32
        x = h.reshape(n, 1, d).expand(n, k, d).to(self.phi.dtype).contiguous()
        self._last_res = []
        args = (self.group, self.sinkhorn_iters, self.sinkhorn_tol, NEWTON_ITERS, self.eps)
        fused = _use_fused(self.kernel, x.device, x.dtype)
        read = _BranchReadFused if fused else _BranchRead
        for index, branch in enumerate(branches):
            inp, mixed, post, res = read.apply(x, self.phi[index], self.bias[index], self.alpha[index], *args)
            y = branch(inp.view(b, s, d)).reshape(n, d)  # F(H_pre X)
            if fused:
                x = _StreamWriteFused.apply(mixed, post, y)  # X <- H_res X + H_post^T y
            else:
                x = torch.addcmul(mixed, post.unsqueeze(-1), y.unsqueeze(1))
            self._last_res.append(res)
        return x.view(b, s, k, d)

    @torch.no_grad()
    def stability_stats(self) -> dict[str, float]:
        """Composite Amax gains of the last forward (mHC paper Fig. 3 quantities) and H_res's DS error.

        The composite is prod_l mean_tokens(H_res^l) over depth (a token-mean per branch: per-token
        products would need every token's path; the mean of doubly-stochastic matrices is doubly
        stochastic, so this is what the bound is about). Forward gain = max |row sum|, backward = max
        |column sum|; both are 1 for exact doubly-stochastic mixing.
        """
        if not self._last_res:
            raise MHCError("stability_stats() needs a forward pass first")
        k = self.n_streams
        composite = torch.eye(k, dtype=torch.float64, device=self._last_res[0].device)
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


class ResidualBranchStack(nn.Module):
    """The backbone contract mHC wraps: ``layers`` with ``attn_branch``/``mlp_branch``, a final ``norm``.

    ``hyper_connections`` None (the default) runs the ordinary pre-norm residual stack h <- h + F(h);
    :func:`apply_mhc` sets it. Subclasses build ``layers`` and ``norm`` after calling ``super().__init__()``.
    """

    def __init__(self):
        super().__init__()
        self.register_module("hyper_connections", None)

    def branches(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """Residual branches in depth order: attn_0, mlp_0, attn_1, mlp_1, ..."""
        return [f for layer in self.layers for f in (layer.attn_branch, layer.mlp_branch)]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[B, S, D] -> [B, S, D]."""
        if self.hyper_connections is None:
            for f in self.branches():
                h = h + f(h)
        else:
            h = self.hyper_connections(h, self.branches())
        return self.norm(h)


def _find_backbone(model: nn.Module) -> nn.Module:
    backbone = getattr(model, "transformer_backbone", model)
    missing = [name for name in ("layers", "hyper_connections") if not hasattr(backbone, name)]
    if missing:
        raise MHCError(
            f"apply_mhc needs `model.transformer_backbone` (or a backbone) with `layers` and `hyper_connections`; "
            f"{type(backbone).__name__} lacks {', '.join(missing)}"
        )
    return backbone


def _hidden_size(backbone: nn.Module) -> int:
    norm = getattr(backbone, "norm", None)
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise MHCError(f"cannot read the hidden size of {type(backbone).__name__}: expected a `norm` with a `weight`")
    return int(weight.shape[-1])


def apply_mhc(model: nn.Module, mhc_cfg: MHCConfig) -> nn.Module:
    """Wrap the backbone's residual branches with mHC (new parameters trainable); n_streams=1 is a no-op."""
    backbone = _find_backbone(model)
    if mhc_cfg.n_streams == 1:
        return model
    if backbone.hyper_connections is not None:
        raise MHCError("apply_mhc: this backbone already has hyper_connections; apply mHC once")
    reference = next(backbone.parameters())
    module = ManifoldHyperConnections(
        dim=_hidden_size(backbone),
        n_branches=2 * len(backbone.layers),
        n_streams=mhc_cfg.n_streams,
        sinkhorn_iters=mhc_cfg.sinkhorn_iters,
        sinkhorn_tol=mhc_cfg.sinkhorn_tol,
        alpha_init=mhc_cfg.alpha_init,
        kernel=mhc_cfg.kernel,
    )
    backbone.hyper_connections = module.to(device=reference.device, dtype=reference.dtype)
    return model
