"""Fused CPU kernels (numba) for mHC's per-token work: one pass over a token's K streams instead of ~20.

Why: on CPU, mHC's cost over a plain residual stack is not arithmetic but eager PyTorch's per-op overhead
and memory traffic: each branch read/write is ~20 separate passes over the [N, K, D] streams plus ~100
tiny ops for the K x K Sinkhorn projection (benchmarks/bench_mhc.py has the profile). Here each token's
coefficients, Sinkhorn-Knopp (with per-matrix early exit and Newton polishing), and the [H_pre; H_res] x
product are computed in one compiled loop over tokens, and so is the backward. The dense products that
BLAS does well (x phi, its gradients) stay in torch. Same maths as ``mhc._BranchRead`` (the torch path,
used on GPU and for other dtypes); tests check the two agree.

Shapes: N tokens, K streams, D hidden width, M = 2K + K^2 coefficients; x [N, K, D].
"""

from __future__ import annotations

import math

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba comes with scanpy; without it mHC uses the torch path
    numba = None

AVAILABLE = numba is not None
_RIDGE = 1e-12  # as mhc._RIDGE: keeps the Laplacian solve regular for (numerically) decomposable matrices
_REL_STEPS = (1.0, 0.5, 0.25, 0.125)  # Newton line search: fractions of the full step ...
_ABS_STEP_POWERS = 11  # ... and absolute lengths 2^-2 .. 2^8 along the step's direction


# reassociation lets LLVM vectorise the dot products over D; no nnan/ninf, so NaN/inf still propagate
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}


def _jit(fn):
    return numba.njit(cache=True, fastmath=_FASTMATH, nogil=True)(fn) if AVAILABLE else fn


@_jit
def _dot(a, b):
    """Dot product accumulated in the inputs' dtype (as BLAS does), so float32 loops vectorise without casts."""
    acc = a[0] * b[0]
    for e in range(1, a.shape[0]):
        acc += a[e] * b[e]
    return acc


@_jit
def _mix_row(w, x, out):
    """out [D] <- sum_s w[s] x[s] for x [K, D]: loops over D innermost, so they vectorise."""
    dim = x.shape[1]
    if x.shape[0] == 4:  # the common case, one pass
        w0, w1, w2, w3 = w[0], w[1], w[2], w[3]
        for e in range(dim):
            out[e] = w0 * x[0, e] + w1 * x[1, e] + w2 * x[2, e] + w3 * x[3, e]
        return
    w0 = w[0]
    for e in range(dim):
        out[e] = w0 * x[0, e]
    for s in range(1, x.shape[0]):
        ws = w[s]
        for e in range(dim):
            out[e] += ws * x[s, e]


@_jit
def _solve_spd(h, b):
    """h [n, n] SPD (overwritten), b [n] (overwritten) -> h^-1 b, Gauss-Jordan without pivoting."""
    n = h.shape[0]
    for k in range(n):
        inv = 1.0 / h[k, k]
        for j in range(n):
            h[k, j] *= inv
        b[k] *= inv
        for i in range(n):
            if i != k:
                f = h[i, k]
                if f != 0.0:
                    for j in range(n):
                        h[i, j] -= f * h[k, j]
                    b[i] -= f * b[k]
    return b


@_jit
def _laplacian(p, h):
    """h <- 11^T/n - P^T P + diag(column sums of P) + ridge, for row-stochastic p [n, n]."""
    n = p.shape[0]
    for j in range(n):
        for l in range(n):
            s = 0.0
            for i in range(n):
                s += p[i, j] * p[i, l]
            h[j, l] = 1.0 / n - s
    for j in range(n):
        c = 0.0
        for i in range(n):
            c += p[i, j]
        h[j, j] += c + _RIDGE


@_jit
def _col_error(m):
    n = m.shape[0]
    err = 0.0
    for j in range(n):
        c = 0.0
        for i in range(n):
            c += m[i, j]
        err = max(err, abs(c - 1.0))
    return err


@_jit
def _normalise(m, rows):
    """Divide each row (rows=True) or column of m [n, n] by its sum, in place."""
    n = m.shape[0]
    for a in range(n):
        s = 0.0
        for b in range(n):
            s += m[a, b] if rows else m[b, a]
        for b in range(n):
            if rows:
                m[a, b] /= s
            else:
                m[b, a] /= s


@_jit
def _psi(m, d, ed):
    """Sinkhorn dual sum_i log sum_j m_ij e^{d_j} - sum_j d_j (0 at d = 0 for row-stochastic m); ed: scratch [n]."""
    n = m.shape[0]
    total = 0.0
    for j in range(n):
        ed[j] = math.exp(d[j])
        total -= d[j]
    for i in range(n):
        s = 0.0
        for j in range(n):
            s += m[i, j] * ed[j]
        total += math.log(s)
    return total


@_jit
def _newton(m, n_iters, tol, h, d, trial, best, ed):
    """Damped Newton on the column potentials of row-stochastic m [n, n] (in place), as mhc._newton_polish."""
    n = m.shape[0]
    for _ in range(n_iters):
        if _col_error(m) < tol:
            return
        _laplacian(m, h)
        for j in range(n):
            c = 0.0
            for i in range(n):
                c += m[i, j]
            d[j] = 1.0 - c
        _solve_spd(h, d)
        if _psi(m, d, best) > 0.0:  # the full step does not decrease the dual: best of a few step lengths
            size = 1e-300
            for j in range(n):
                size = max(size, abs(d[j]))
            best_psi = 0.0  # t = 0 is a candidate: never increase psi
            for j in range(n):
                best[j] = 0.0
            for k in range(len(_REL_STEPS) + _ABS_STEP_POWERS):
                t = _REL_STEPS[k] if k < len(_REL_STEPS) else 2.0 ** (k - len(_REL_STEPS) - 2) / size
                t = min(t, 300.0 / size)
                for j in range(n):
                    trial[j] = t * d[j]
                value = _psi(m, trial, ed)
                if value < best_psi:
                    best_psi = value
                    for j in range(n):
                        best[j] = trial[j]
            for j in range(n):
                d[j] = best[j]
        for j in range(n):
            ed[j] = math.exp(d[j])
        for i in range(n):
            for j in range(n):
                m[i, j] *= ed[j]
        _normalise(m, True)
        _normalise(m, False)
        _normalise(m, True)


@_jit
def _project_backward_one(p, g, out, h, q_rows, b):
    """Implicit-differentiation gradient of the logits for one matrix (as mhc._project_backward) into out."""
    n = p.shape[0]
    for i in range(n):
        s = 0.0
        for j in range(n):
            s += p[i, j] * g[i, j]
        q_rows[i] = s
    for j in range(n):
        s = 0.0
        for i in range(n):
            s += p[i, j] * g[i, j] - p[i, j] * q_rows[i]
        b[j] = s
    _laplacian(p, h)
    _solve_spd(h, b)
    for i in range(n):
        a = q_rows[i]
        for j in range(n):
            a -= p[i, j] * b[j]
        for j in range(n):
            out[i, j] = p[i, j] * (g[i, j] - a - b[j])


@_jit
def _project_many(logits, out, n_iters, tol, newton_iters):
    """Logits [N, n, n] -> out [N, n, n] doubly stochastic; the sweeps run over all N matrices at once.

    Sweeps are vectorised across matrices (batch-last scratch [n, n, N]): per matrix they are only ~80
    scalar flops, too few to vectorise within one. Sinkhorn stops when every matrix is within tol;
    the ones still above it after n_iters sweeps get per-matrix Newton polishing (_newton).
    """
    count, n = logits.shape[0], logits.shape[1]
    m = np.empty((n, n, count))
    sums = np.empty(count)
    for t in range(count):  # rows, then columns, shifted to max 0: each holds an exact 1 after exp
        for i in range(n):
            top = logits[t, i, 0]
            for j in range(1, n):
                top = max(top, logits[t, i, j])
            for j in range(n):
                m[i, j, t] = logits[t, i, j] - top
        for j in range(n):
            top = m[0, j, t]
            for i in range(1, n):
                top = max(top, m[i, j, t])
            for i in range(n):
                m[i, j, t] = math.exp(m[i, j, t] - top)
    for i in range(n):
        _normalise_many(m, i, True, sums)
    for _ in range(n_iters):
        err = 0.0
        for j in range(n):
            err = max(err, _normalise_many(m, j, False, sums))
        if err < tol:  # measured before this column step: the matrices were already within tol
            break
        for i in range(n):
            _normalise_many(m, i, True, sums)
    h, d, trial, best, ed = np.empty((n, n)), np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    one = np.empty((n, n))
    for t in range(count):
        for i in range(n):
            for j in range(n):
                one[i, j] = m[i, j, t]
        _normalise(one, True)
        if newton_iters > 0 and _col_error(one) >= tol:
            _newton(one, newton_iters, tol, h, d, trial, best, ed)
        for i in range(n):
            for j in range(n):
                out[t, i, j] = one[i, j]


@_jit
def _normalise_many(m, index, row, sums):
    """Normalise row (or column) `index` of every matrix in m [n, n, N]; returns the largest |sum - 1| before."""
    n, count = m.shape[0], m.shape[2]
    for t in range(count):
        sums[t] = 0.0
    for a in range(n):
        src = m[index, a] if row else m[a, index]
        for t in range(count):
            sums[t] += src[t]
    err = 0.0
    for t in range(count):
        err = max(err, abs(sums[t] - 1.0))
        sums[t] = 1.0 / sums[t]
    for a in range(n):
        dst = m[index, a] if row else m[a, index]
        for t in range(count):
            dst[t] *= sums[t]
    return err


@_jit
def project(logits, n_iters, tol, newton_iters):
    """Logits [N, n, n] float64 -> doubly-stochastic [N, n, n] float64 (rows exact, columns within tol)."""
    out = np.empty_like(logits)
    _project_many(logits, out, n_iters, tol, newton_iters)
    return out


@_jit
def project_backward(p, g):
    """p, upstream g [N, n, n] float64 -> gradient of the logits [N, n, n]."""
    count, n = p.shape[0], p.shape[1]
    out = np.empty_like(p)
    h, q_rows, b = np.empty((n, n)), np.empty(n), np.empty(n)
    for t in range(count):
        _project_backward_one(p[t], g[t], out[t], h, q_rows, b)
    return out


@_jit
def branch_read_forward(x, t, bias, gate, eps, n_iters, tol, newton_iters):
    """x [N, K, D], t = flat(x) phi [N, M] -> inp [N, D], mixed [N, K, D], gates [N, 2K], p [N, K, K] f64, r [N].

    Per token: r = rsqrt(mean(x^2) + eps), c = bias + gate * t * r, gates = sigmoid(c[:2K]),
    p = Sinkhorn(c[2K:]), inp = gates[:K] x, mixed = p x.
    """
    count, k, dim = x.shape
    inp = np.empty((count, dim), dtype=x.dtype)
    mixed = np.empty_like(x)
    gates = np.empty((count, 2 * k), dtype=x.dtype)
    p = np.empty((count, k, k))
    r = np.empty(count, dtype=x.dtype)
    logits = np.empty((count, k, k))
    for n in range(count):
        xn = x[n]
        sq = 0.0
        for s in range(k):
            sq += _dot(xn[s], xn[s])
        rn = 1.0 / math.sqrt(sq / (k * dim) + eps)
        r[n] = rn
        for j in range(2 * k):
            gates[n, j] = 1.0 / (1.0 + math.exp(-(bias[j] + gate[j] * t[n, j] * rn)))
        for i in range(k):
            for j in range(k):
                m = 2 * k + i * k + j
                logits[n, i, j] = bias[m] + gate[m] * t[n, m] * rn
    _project_many(logits, p, n_iters, tol, newton_iters)
    for n in range(count):
        xn, pn = x[n], p[n]
        _mix_row(gates[n, :k], xn, inp[n])
        for i in range(k):
            _mix_row(pn[i], xn, mixed[n, i])
    return inp, mixed, gates, p, r


@_jit
def branch_read_backward(x, t, r, gate, gates, p, g_inp, g_mixed, g_post):
    """Gradients of branch_read_forward's outputs -> g_x [N, K, D] (without the x phi term), g_c [N, M], g_t [N, M].

    The caller adds g_t phi^T to g_x and forms g_phi = flat^T g_t, g_bias = sum g_c, g_alpha from g_c * u.
    """
    count, k, dim = x.shape
    m_coef = 2 * k + k * k
    g_x = np.empty_like(x)
    g_c = np.empty((count, m_coef), dtype=x.dtype)
    g_t = np.empty((count, m_coef), dtype=x.dtype)
    g_a = np.empty((k + 1, k))
    g_res_in = np.empty((k, k))
    g_res = np.empty((k, k))
    h, q_rows, b = np.empty((k, k)), np.empty(k), np.empty(k)
    for n in range(count):
        xn, pn, gm, gi = x[n], p[n], g_mixed[n], g_inp[n]
        # g_a[0, s] = <g_inp, x_s>, g_a[1 + i, s] = <g_mixed_i, x_s>
        for s in range(k):
            g_a[0, s] = _dot(gi, xn[s])
            for i in range(k):
                g_a[1 + i, s] = _dot(gm[i], xn[s])
        for i in range(k):
            for s in range(k):
                g_res_in[i, s] = g_a[1 + i, s]
        _project_backward_one(pn, g_res_in, g_res, h, q_rows, b)
        rn = r[n]
        dot = 0.0  # sum_m g_u[m] t[m], for the gradient through r
        for j in range(m_coef):
            if j < k:
                gc = g_a[0, j] * gates[n, j] * (1.0 - gates[n, j])
            elif j < 2 * k:
                gc = 2.0 * g_post[n, j - k] * gates[n, j] * (1.0 - gates[n, j])
            else:
                gc = g_res[(j - 2 * k) // k, (j - 2 * k) % k]
            g_c[n, j] = gc
            gu = gc * gate[j]
            g_t[n, j] = gu * rn
            dot += gu * t[n, j]
        scale = -dot * rn * rn * rn / (k * dim)  # r = (|x|^2 / KD + eps)^(-1/2): dr/dx = -r^3 x / KD
        # g_x_s = gates_s g_inp + sum_i p_is g_mixed_i + scale x_s, written in one pass per stream
        for s in range(k):
            out, xs = g_x[n, s], xn[s]
            w = gates[n, s]
            if k == 4:  # the common case, one pass
                w0, w1, w2, w3 = pn[0, s], pn[1, s], pn[2, s], pn[3, s]
                for e in range(dim):
                    out[e] = (w * gi[e] + w0 * gm[0, e] + w1 * gm[1, e] + w2 * gm[2, e] + w3 * gm[3, e]
                              + scale * xs[e])
            else:
                for e in range(dim):
                    out[e] = w * gi[e] + scale * xs[e]
                for i in range(k):
                    wi = pn[i, s]
                    for e in range(dim):
                        out[e] += wi * gm[i, e]
    return g_x, g_c, g_t


@_jit
def stream_write(mixed, post, y):
    """mixed += post[..., None] * y, in place: mixed [N, K, D], post [N, K], y [N, D]; one pass, no new buffer."""
    count, k, dim = mixed.shape
    for n in range(count):
        yn = y[n]
        for s in range(k):
            w, dst = post[n, s], mixed[n, s]
            for e in range(dim):
                dst[e] += w * yn[e]


@_jit
def stream_write_backward(g, y, post):
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
