"""Optional compiled CPU path (numba) for mHC: the torch path's maths (stlib.adapters.mhc) in per-token loops.

Same interface as the torch path, as three autograd-aware functions: ``branch_read`` (coefficients,
Sinkhorn and the [H_pre; H_res] x product of one branch), ``stream_write`` (X <- mixed + H_post^T y) and
``project`` (Sinkhorn-Knopp alone). Each token's coefficients and stream products are one compiled pass
over its K streams instead of ~20 eager tensor passes; the small K x K algebra (sweeps, Newton, the
implicit-differentiation solve) runs batch-last, [K, K, N], so its loops over N vectorise. The dense
products BLAS does well (x phi and its gradients) stay in torch. tests/adapters/test_mhc.py checks this
path against the torch path on values and gradients.

Compiled with error_model="numpy" (a division by zero gives inf/NaN, as in torch, instead of raising): the
default python error model checks every division and keeps those loops scalar.

Shapes: N tokens, K streams, D hidden width, M = 2K + K^2 coefficients, T matrices; x [N, K, D].
"""

from __future__ import annotations

import math

import numpy as np
import torch

try:
    import numba
except ImportError:  # pragma: no cover - numba comes with scanpy; without it mHC uses the torch path
    numba = None

AVAILABLE = numba is not None
_RIDGE = 1e-12  # as mhc._RIDGE
_REL_STEPS = (0.5, 0.25, 0.125)  # Newton line search: fractions of the full step, as mhc._newton ...
_ABS_STEP_POWERS = 11  # ... and absolute lengths 2^-2 .. 2^8 along the step's direction
_TILE = 64  # tokens per tile in the backward: a tile's streams and gradients stay in L2 between passes
# reassociation lets LLVM vectorise the dot products over D; no nnan/ninf, so NaN/inf still propagate
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}


def _jit(fn):
    return numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, error_model="numpy")(fn) if AVAILABLE else fn


def fits(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether these kernels can run on tensors of this device and dtype."""
    return AVAILABLE and device.type == "cpu" and dtype in (torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------- K x K algebra


@_jit
def _nan_max(a, b):
    """max(a, b) that keeps a NaN (Python's max in numba drops one): a NaN error must never read as converged."""
    return a if a >= b else b if b >= a else math.nan


@_jit
def _dot(a, b):
    """Dot product accumulated in the inputs' dtype (as BLAS does), so float32 loops vectorise without casts."""
    acc = a[0] * b[0]
    for e in range(1, a.shape[0]):
        acc += a[e] * b[e]
    return acc


@_jit
def _mix_row(w, x, out):
    """out [D] <- sum_s w[s] x[s] for x [K, D]; D innermost, so the loops vectorise."""
    w0 = w[0]
    for e in range(x.shape[1]):
        out[e] = w0 * x[0, e]
    for s in range(1, x.shape[0]):
        ws = w[s]
        for e in range(x.shape[1]):
            out[e] += ws * x[s, e]


@_jit
def _laplacian(p, h):
    """h[:, :, t] <- 11^T/n - P^T P + diag(column sums of P) + ridge for row-stochastic p [n, n, T] (mhc._laplacian_system)."""
    n, count = p.shape[0], p.shape[2]
    for j in range(n):
        for l in range(n):
            hjl = h[j, l]
            for t in range(count):
                hjl[t] = 1.0 / n
            for i in range(n):
                pij, pil = p[i, j], p[i, l]
                for t in range(count):
                    hjl[t] -= pij[t] * pil[t]
        hjj = h[j, j]
        for t in range(count):
            hjj[t] += _RIDGE
        for i in range(n):
            pij = p[i, j]
            for t in range(count):
                hjj[t] += pij[t]


@_jit
def _solve(h, b):
    """h [n, n, T] SPD (overwritten), b [n, T] (overwritten) -> h^-1 b per t, Gauss-Jordan without pivoting."""
    n, count = h.shape[0], h.shape[2]
    for k in range(n):
        hkk, bk = h[k, k], b[k]
        for t in range(count):
            hkk[t] = 1.0 / hkk[t]
        for j in range(n):
            if j != k:
                hkj = h[k, j]
                for t in range(count):
                    hkj[t] *= hkk[t]
        for t in range(count):
            bk[t] *= hkk[t]
        for i in range(n):
            if i != k:
                hik, bi = h[i, k], b[i]
                for j in range(n):
                    if j != k:
                        hij, hkj = h[i, j], h[k, j]
                        for t in range(count):
                            hij[t] -= hik[t] * hkj[t]
                for t in range(count):
                    bi[t] -= hik[t] * bk[t]


@_jit
def _col_errors(m, err, sums):
    """err[t] = max_j |column j sum - 1| of each matrix in m [n, n, T]; sums: scratch [T]."""
    n, count = m.shape[0], m.shape[2]
    err[:] = 0.0
    for j in range(n):
        sums[:] = 0.0
        for i in range(n):
            mij = m[i, j]
            for t in range(count):
                sums[t] += mij[t]
        for t in range(count):
            err[t] = _nan_max(err[t], abs(sums[t] - 1.0))


@_jit
def _normalise(m, index, row, sums, tol):
    """Normalise row (or column) `index` of every matrix in m [n, n, T]; returns how many sums were off by >= tol.

    A count, not the max error: an integer sum vectorises where a float max reduction (without nnan) does not.
    """
    n, count = m.shape[0], m.shape[2]
    off = 0
    for t in range(count):
        sums[t] = 0.0
    for a in range(n):
        src = m[index, a] if row else m[a, index]
        for t in range(count):
            sums[t] += src[t]
    for t in range(count):
        off += abs(sums[t] - 1.0) >= tol
        sums[t] = 1.0 / sums[t]
    for a in range(n):
        dst = m[index, a] if row else m[a, index]
        for t in range(count):
            dst[t] *= sums[t]
    return off


@_jit
def _normalise_all(m, row, sums, tol):
    """Every row (or column) of every matrix in m [n, n, T]; returns how many sums were off by >= tol."""
    off = 0
    for index in range(m.shape[0]):
        off += _normalise(m, index, row, sums, tol)
    return off


@_jit
def _shift_logits(m):
    """Logits m [n, n, T] (in place): rows, then columns, shifted to max 0, as mhc._project does."""
    n, count = m.shape[0], m.shape[2]
    top = np.empty(count)
    for row in (True, False):
        for index in range(n):
            first = m[index, 0] if row else m[0, index]
            for t in range(count):
                top[t] = first[t]
            for a in range(1, n):
                src = m[index, a] if row else m[a, index]
                for t in range(count):
                    top[t] = max(top[t], src[t])
            for a in range(n):
                dst = m[index, a] if row else m[a, index]
                for t in range(count):
                    dst[t] -= top[t]


@_jit
def _psi(m, u, d, ed):
    """Sinkhorn dual of matrix u of m [n, n, T] at column step d [n] (0 at d = 0 for row-stochastic m), as mhc._dual."""
    n = m.shape[0]
    total = 0.0
    for j in range(n):
        ed[j] = math.exp(d[j])
        total -= d[j]
    for i in range(n):
        s = 0.0
        for j in range(n):
            s += m[i, j, u] * ed[j]
        total += math.log(s)
    return total


@_jit
def _newton(m, n_iters, tol):
    """mhc._newton on row-stochastic m [n, n, T] (in place): full Newton steps where they decrease psi, else the best
    of the line search's step lengths, each matrix on its own."""
    n, count = m.shape[0], m.shape[2]
    h, d = np.empty((n, n, count)), np.empty((n, count))
    err, sums = np.empty(count), np.empty(count)
    step, trial, best, ed = np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    for _ in range(n_iters):
        _col_errors(m, err, sums)
        if not err.max() >= tol:  # written so that a NaN error does not stop the loop early as converged
            return
        for j in range(n):
            d[j] = 1.0
            for i in range(n):
                d[j] -= m[i, j]
        _laplacian(m, h)
        _solve(h, d)
        for u in range(count):
            for j in range(n):
                step[j] = d[j, u]
            if _psi(m, u, step, ed) > 0.0:  # the full step does not decrease the dual: best of a few lengths
                size = 1e-300
                for j in range(n):
                    size = max(size, abs(step[j]))
                best_psi = 0.0  # t = 0 is a candidate: never increase psi
                best[:] = 0.0
                for k in range(len(_REL_STEPS) + _ABS_STEP_POWERS):
                    t = _REL_STEPS[k] if k < len(_REL_STEPS) else 2.0 ** (k - len(_REL_STEPS) - 2) / size
                    t = min(t, 300.0 / size)
                    for j in range(n):
                        trial[j] = t * step[j]
                    value = _psi(m, u, trial, ed)
                    if value < best_psi:
                        best_psi = value
                        best[:] = trial
                step[:] = best
            for j in range(n):
                e = math.exp(step[j])
                for i in range(n):
                    m[i, j, u] *= e
        _normalise_all(m, True, sums, tol)
        _normalise_all(m, False, sums, tol)
        _normalise_all(m, True, sums, tol)


@_jit
def _balance(m, out, n_iters, tol, newton_iters):
    """exp(shifted logits) m [n, n, N] (overwritten) -> out [N, n, n] doubly stochastic, as mhc._project.

    Sinkhorn sweeps over all N matrices at once until every one is within tol; the ones still above it after
    n_iters sweeps are gathered and polished by _newton. tol <= 0: exactly n_iters sweeps, no Newton.
    """
    n, count = m.shape[0], m.shape[2]
    sums, err = np.empty(count), np.empty(count)
    _normalise_all(m, True, sums, tol)
    for _ in range(n_iters):
        if _normalise_all(m, False, sums, tol) == 0:  # counted before this column step; never with tol <= 0
            break
        _normalise_all(m, True, sums, tol)
    _normalise_all(m, True, sums, tol)
    _col_errors(m, err, sums)
    bad = np.flatnonzero(err >= tol)
    if tol > 0 and newton_iters > 0 and len(bad) > 0:
        sub = np.empty((n, n, len(bad)))
        for i in range(n):
            for j in range(n):
                for u in range(len(bad)):
                    sub[i, j, u] = m[i, j, bad[u]]
        _newton(sub, newton_iters, tol)
        for i in range(n):
            for j in range(n):
                for u in range(len(bad)):
                    m[i, j, bad[u]] = sub[i, j, u]
    for i in range(n):
        for j in range(n):
            src = m[i, j]
            for t in range(count):
                out[t, i, j] = src[t]


@_jit
def _project_backward(p, g, out, h, q_rows, b):
    """mhc._project_backward for p, upstream g [n, n, T] into out [n, n, T]; scratch h [n, n, T], q_rows, b [n, T]."""
    n, count = p.shape[0], p.shape[2]
    for i in range(n):
        qi = q_rows[i]
        for t in range(count):
            qi[t] = 0.0
        for j in range(n):
            pij, gij = p[i, j], g[i, j]
            for t in range(count):
                qi[t] += pij[t] * gij[t]
    for j in range(n):
        bj = b[j]
        for t in range(count):
            bj[t] = 0.0
        for i in range(n):
            pij, gij, qi = p[i, j], g[i, j], q_rows[i]
            for t in range(count):
                bj[t] += pij[t] * (gij[t] - qi[t])
    _laplacian(p, h)
    _solve(h, b)
    for i in range(n):
        qi = q_rows[i]  # becomes a_i = q_rows_i - sum_j p_ij b_j
        for j in range(n):
            pij, bj = p[i, j], b[j]
            for t in range(count):
                qi[t] -= pij[t] * bj[t]
        for j in range(n):
            pij, gij, bj, oij = p[i, j], g[i, j], b[j], out[i, j]
            for t in range(count):
                oij[t] = pij[t] * (gij[t] - qi[t] - bj[t])


def _project_numpy(logits, n_iters, tol, newton_iters):
    """Logits [N, n, n] float64 -> doubly-stochastic [N, n, n] float64 (rows exact, columns within tol)."""
    m = logits.transpose(1, 2, 0).copy()  # batch-last, and a copy: the steps below overwrite it
    _shift_logits(m)
    out = np.empty_like(logits)
    _balance(np.exp(m, out=m), out, n_iters, tol, newton_iters)  # numpy's exp is SIMD, numba's one call per value
    return out


@_jit
def _project_backward_numpy(p, g):
    """p, upstream g [N, n, n] float64 -> gradient of the logits [N, n, n]."""
    count, n = p.shape[0], p.shape[1]
    out = np.empty((n, n, count))
    _project_backward(p.transpose(1, 2, 0).copy(), g.transpose(1, 2, 0).copy(), out, np.empty((n, n, count)),
                      np.empty((n, count)), np.empty((n, count)))
    return out.transpose(2, 0, 1).copy()


# ------------------------------------------------------------------------------------------- branch read / write


def _branch_read_forward(x, t_rows, bias, gate, eps, n_iters, tol, newton_iters):
    """x [N, K, D], t_rows = (flat(x) phi)^T [M, N] -> inp [N, D], mixed [N, K, D], gates [N, 2K], p [N, K, K] f64, r [N].

    Per token: r = rsqrt(mean(x^2) + eps), c = bias + gate * t * r, gates = sigmoid(c[:2K]),
    p = Sinkhorn(c[2K:]), inp = gates[:K] x, mixed = p x; two compiled passes around numpy's SIMD exp.
    """
    neg_gate_logits, logits, r = _coefficients(x, t_rows, bias, gate, eps)
    with np.errstate(over="ignore"):  # exp(-c) = inf for very negative gate logits: sigmoid 0, as it should be
        np.exp(neg_gate_logits, out=neg_gate_logits)
    np.exp(logits, out=logits)  # shifted to <= 0: no overflow
    return _balance_and_mix(x, neg_gate_logits, logits, r, n_iters, tol, newton_iters)


@_jit
def _coefficients(x, t_rows, bias, gate, eps):
    """-(gate logits) [N, 2K], shifted H_res logits [K, K, N] f64 (batch-last) and r [N]."""
    count, k, dim = x.shape
    neg = np.empty((count, 2 * k), dtype=x.dtype)
    r = np.empty(count, dtype=x.dtype)
    logits = np.empty((k, k, count))
    for n in range(count):
        xn = x[n]
        sq = 0.0
        for s in range(k):
            sq += _dot(xn[s], xn[s])
        rn = 1.0 / math.sqrt(sq / (k * dim) + eps)
        r[n] = rn
        for j in range(2 * k):
            neg[n, j] = -(bias[j] + gate[j] * t_rows[j, n] * rn)
        for i in range(k):
            for j in range(k):
                m = 2 * k + i * k + j
                logits[i, j, n] = bias[m] + gate[m] * t_rows[m, n] * rn
    _shift_logits(logits)
    return neg, logits, r


@_jit
def _balance_and_mix(x, exp_neg, m, r, n_iters, tol, newton_iters):
    """The rest of _branch_read_forward, from exp(-gate logits) and exp(shifted H_res logits)."""
    count, k, dim = x.shape
    inp = np.empty((count, dim), dtype=x.dtype)
    mixed = np.empty_like(x)
    gates = np.empty((count, 2 * k), dtype=x.dtype)
    for n in range(count):
        for j in range(2 * k):
            gates[n, j] = 1.0 / (1.0 + exp_neg[n, j])
    p = np.empty((count, k, k))
    _balance(m, p, n_iters, tol, newton_iters)
    w = np.empty((k + 1, k), dtype=x.dtype)  # [H_pre; H_res] in x's dtype, so float32 data stays float32
    for n in range(count):
        xn, pn = x[n], p[n]
        for s in range(k):
            w[0, s] = gates[n, s]
            for i in range(k):
                w[1 + i, s] = pn[i, s]
        _mix_row(w[0], xn, inp[n])
        for i in range(k):
            _mix_row(w[1 + i], xn, mixed[n, i])
    return inp, mixed, gates, p, r


@_jit
def _branch_read_backward(x, t_rows, r, gate, gates, p, g_inp, g_mixed, g_post):
    """Gradients of _branch_read_forward's outputs -> g_x [N, K, D] (without the x phi term), g_t [N, M], g_bias [M],
    g_alpha [3] (pre/post/res gates over coefficients [0, K), [K, 2K), [2K, M), as ManifoldHyperConnections.group).

    Per tile of tokens: the dot products <g, x_s>, the Sinkhorn backward for the whole tile (vectorised across
    tokens), then g_x while the tile is still in cache. The caller adds g_t phi^T to g_x and forms g_phi.
    """
    count, k, dim = x.shape
    m_coef = 2 * k + k * k
    g_x = np.empty_like(x)
    g_t = np.empty((count, m_coef), dtype=x.dtype)
    g_bias = np.zeros(m_coef)
    g_alpha = np.zeros(3)
    g_pre = np.empty((k, _TILE))  # <g_inp, x_s> per token of the tile
    p_bl, g_bl, g_res = np.empty((k, k, _TILE)), np.empty((k, k, _TILE)), np.empty((k, k, _TILE))
    h, q_rows, b = np.empty((k, k, _TILE)), np.empty((k, _TILE)), np.empty((k, _TILE))
    w = np.empty(k + 2, dtype=x.dtype)  # per stream: gate, p[:, s], the rms term; x's dtype keeps float32 in float32
    for start in range(0, count, _TILE):
        size = min(_TILE, count - start)
        for u in range(size):
            n = start + u
            xn, gm, gi = x[n], g_mixed[n], g_inp[n]
            for s in range(k):
                g_pre[s, u] = _dot(gi, xn[s])
                for i in range(k):
                    g_bl[i, s, u] = _dot(gm[i], xn[s])
                    p_bl[i, s, u] = p[n, i, s]
        for i in range(k):  # pad the last tile with uniform P and zero gradient: every call sees whole tiles
            for s in range(k):
                p_bl[i, s, size:] = 1.0 / k
                g_bl[i, s, size:] = 0.0
        _project_backward(p_bl, g_bl, g_res, h, q_rows, b)
        for u in range(size):
            n = start + u
            xn, pn, gm, gi = x[n], p[n], g_mixed[n], g_inp[n]
            rn = r[n]
            dot = 0.0  # sum_m g_u[m] t[m], for the gradient through r
            for j in range(m_coef):
                if j < k:
                    gc = g_pre[j, u] * gates[n, j] * (1.0 - gates[n, j])
                elif j < 2 * k:
                    gc = 2.0 * g_post[n, j - k] * gates[n, j] * (1.0 - gates[n, j])
                else:
                    gc = g_res[(j - 2 * k) // k, (j - 2 * k) % k, u]
                g_bias[j] += gc
                g_alpha[0 if j < k else (1 if j < 2 * k else 2)] += gc * t_rows[j, n] * rn
                gu = gc * gate[j]
                g_t[n, j] = gu * rn
                dot += gu * t_rows[j, n]
            w[k + 1] = -dot * rn * rn * rn / (k * dim)  # r = (|x|^2/KD + eps)^(-1/2): dr/dx = -r^3 x / KD
            for s in range(k):  # g_x_s = gates_s g_inp + sum_i p_is g_mixed_i + scale x_s
                out, xs = g_x[n, s], xn[s]
                w[0] = gates[n, s]
                for i in range(k):
                    w[1 + i] = pn[i, s]
                w_in, scale = w[0], w[k + 1]
                for e in range(dim):
                    out[e] = w_in * gi[e] + scale * xs[e]
                for i in range(k):
                    wi = w[1 + i]
                    for e in range(dim):
                        out[e] += wi * gm[i, e]
    return g_x, g_t, g_bias.astype(x.dtype), g_alpha.astype(x.dtype)


@_jit
def _stream_write(mixed, post, y):
    """mixed += post[..., None] * y, in place: mixed [N, K, D], post [N, K], y [N, D]."""
    count, k, dim = mixed.shape
    for n in range(count):
        yn = y[n]
        for s in range(k):
            w, dst = post[n, s], mixed[n, s]
            for e in range(dim):
                dst[e] += w * yn[e]


@_jit
def _stream_write_backward(g, y, post):
    """Backward of x = mixed + post[..., None] * y: g [N, K, D], y [N, D], post [N, K] -> g_post [N, K], g_y [N, D]."""
    count, k, dim = g.shape
    g_post = np.empty((count, k), dtype=g.dtype)
    g_y = np.zeros((count, dim), dtype=g.dtype)
    for n in range(count):
        yn, gy = y[n], g_y[n]
        for s in range(k):
            gs = g[n, s]
            g_post[n, s] = _dot(gs, yn)
            w = post[n, s]
            for e in range(dim):
                gy[e] += w * gs[e]
    return g_post, g_y


# ------------------------------------------------------------------------------------------- torch interface


class _Project(torch.autograd.Function):
    """mhc._SinkhornKnopp through these kernels: logits [..., n, n] -> same shape and dtype."""

    @staticmethod
    def forward(ctx, logits, n_iters, tol, newton_iters):
        shape = logits.shape
        flat = logits.detach().reshape(-1, shape[-2], shape[-1]).to(torch.float64).contiguous()
        p = torch.from_numpy(_project_numpy(flat.numpy(), n_iters, tol, newton_iters))
        ctx.save_for_backward(p)
        return p.to(logits.dtype).reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        (p,) = ctx.saved_tensors
        g = grad.reshape(p.shape).to(torch.float64).contiguous()
        dl = torch.from_numpy(_project_backward_numpy(p.numpy(), g.numpy()))
        return dl.to(grad.dtype).reshape(grad.shape), None, None, None


class _BranchRead(torch.autograd.Function):
    """mhc._BranchRead through these kernels (same arguments and outputs)."""

    @staticmethod
    def forward(ctx, x, phi, bias, alpha, group, n_iters, tol, newton_iters, eps):
        n, k, d = x.shape
        x = x.contiguous()
        flat = x.view(n, k * d)
        with torch.autocast(x.device.type, enabled=False):  # as mhc._BranchRead
            t_rows = torch.mm(phi.T, flat.T)  # (x phi)^T [M, N]: the faster matmul orientation on CPU
        gate = alpha[group]
        inp, mixed, gates, p, r = _branch_read_forward(
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
        g_x, g_t, g_bias, g_alpha = (torch.from_numpy(a) for a in _branch_read_backward(
            x.numpy(), t_rows.detach().numpy(), r.numpy(), gate.detach().numpy(), gates.numpy(), p.numpy(),
            g_inp.contiguous().numpy(), g_mixed.contiguous().numpy(), g_post.contiguous().numpy(),
        ))
        flat = x.view(n, k * d)
        g_x.view(n, k * d).addmm_(g_t, phi.detach().T)
        g_phi = (g_t.T @ flat).T  # [K*D, M]; the faster matmul orientation on CPU
        return g_x, g_phi, g_bias, g_alpha, None, None, None, None, None


class _StreamWrite(torch.autograd.Function):
    """X <- mixed + H_post^T y, written into `mixed` itself (marked dirty): the branch read made it for this."""

    @staticmethod
    def forward(ctx, mixed, post, y):
        y = y.to(mixed.dtype)  # a branch under bf16 autocast returns bf16; the streams keep their own dtype
        ctx.save_for_backward(post, y)
        _stream_write(mixed.detach().numpy(), post.detach().contiguous().numpy(), y.detach().contiguous().numpy())
        ctx.mark_dirty(mixed)
        return mixed

    @staticmethod
    def backward(ctx, g):
        post, y = ctx.saved_tensors
        g_post, g_y = _stream_write_backward(g.contiguous().numpy(), y.detach().contiguous().numpy(),
                                             post.detach().contiguous().numpy())
        return g, torch.from_numpy(g_post), torch.from_numpy(g_y)


project = _Project.apply
branch_read = _BranchRead.apply
stream_write = _StreamWrite.apply


def compile_kernels() -> None:
    """Compile (and cache on disk) every kernel for float32 and float64 streams once, so that the first mHC
    training step does not stall on compilation (`make setup` runs it)."""
    if not AVAILABLE:
        return
    rng = np.random.default_rng(0)
    k, dim, count = 4, 8, 3
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((count, k, dim)).astype(dtype)
        t_rows = rng.standard_normal((2 * k + k * k, count)).astype(dtype)
        bias, gate = np.zeros(2 * k + k * k, dtype), np.ones(2 * k + k * k, dtype)
        inp, mixed, gates, p, r = _branch_read_forward(x, t_rows, bias, gate, 1e-6, 20, 1e-6, 30)
        _branch_read_backward(x, t_rows, r, gate, gates, p, inp, mixed, gates[:, k:].copy())
        _stream_write(mixed, gates[:, k:].copy(), inp)
        _stream_write_backward(mixed, inp, gates[:, k:].copy())
    logits = rng.standard_normal((count, k, k)) * 10
    _project_backward_numpy(_project_numpy(logits, 20, 1e-6, 30), logits)
