"""Fused CPU kernels (numba) for mHC's per-token work: one pass over a token's K streams instead of ~20.

Why: on CPU, mHC's cost over a plain residual stack is not arithmetic but eager PyTorch's per-op overhead
and memory traffic: each branch read/write is ~20 separate passes over the [N, K, D] streams plus ~100
tiny ops for the K x K Sinkhorn projection (benchmarks/bench_mhc.py has the profile). Here each token's
coefficients and the [H_pre; H_res] x product are computed in one compiled loop over tokens, and so is the
backward. The small per-token matrix algebra (Sinkhorn sweeps, Newton steps, the implicit-differentiation
solve) runs batch-last, [K, K, N], so that it vectorises across tokens; numpy's SIMD exp sits between two
compiled passes. The dense products that BLAS does well (x phi, its gradients) stay in torch. Same maths as
``mhc._BranchRead`` (the torch path, used on GPU and for other dtypes); tests check the two agree.

Compiled with error_model="numpy" (a division by zero gives inf/NaN, as in torch, instead of raising): the
default python error model checks every division and keeps those loops scalar.

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
_VECTOR_NEWTON_STEPS = 4  # full Newton steps taken for all unconverged matrices at once before the per-matrix ones
_VECTOR_NEWTON_MAX_STEP = 1.0  # ... when no column potential moves by more than this (log scale)


# reassociation lets LLVM vectorise the dot products over D; no nnan/ninf, so NaN/inf still propagate
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}


def _jit(fn):
    return numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, error_model="numpy")(fn) if AVAILABLE else fn


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
        err = _nan_max(err, abs(c - 1.0))
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
def _project_backward_many(p, g, out, h, q_rows, b):
    """Implicit-differentiation gradient of the logits for p, upstream g [n, n, T] (batch-last) into out [n, n, T].

    As mhc._project_backward: q = P*G, solve (diag(c) - P^T P + 11^T/n) b = (P*G)^T 1 - P^T (P*G) 1, a = (P*G) 1
    - P b, dL = P * (G - a 1^T - 1 b^T). T innermost everywhere, so the small per-matrix algebra vectorises.
    Scratch: h [n, n, T], q_rows [n, T], b [n, T].
    """
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
    _laplacian_many(p, h)
    _solve_spd_many(h, b)
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


@_jit
def _laplacian_many(p, h):
    """h[:, :, t] <- 11^T/n - P^T P + diag(column sums of P) + ridge for row-stochastic p [n, n, T]."""
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
def _solve_spd_many(h, b):
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
def _shift_logits(m):
    """Logits m [n, n, N] (batch-last, in place): rows, then columns, shifted to max 0.

    After exp every row and column then holds an exact 1, so none underflows to 0 in float64 even for
    logit ranges of several hundred. The exp itself is numpy's (vectorised; numba's is one call per value).
    """
    n, count = m.shape[0], m.shape[2]
    top = np.empty(count)
    for i in range(n):
        _shift_to_zero(m, i, True, top)
    for j in range(n):
        _shift_to_zero(m, j, False, top)


@_jit
def _balance(m, out, n_iters, tol, newton_iters):
    """exp(shifted logits) m [n, n, N] (batch-last, overwritten) -> out [N, n, n] doubly stochastic.

    Every step runs over all N matrices at once with N innermost (contiguous, so it vectorises): per matrix a
    sweep is only ~80 scalar flops, too few to vectorise within one. Sinkhorn stops when every matrix is
    within tol; the ones still above it after n_iters sweeps get per-matrix Newton polishing (_newton).
    """
    n, count = m.shape[0], m.shape[2]
    sums = np.empty(count)
    for i in range(n):
        _normalise_many(m, i, True, sums, tol)
    for _ in range(n_iters):
        off = 0
        for j in range(n):
            off += _normalise_many(m, j, False, sums, tol)
        if off == 0:  # measured before this column step: the matrices were already within tol
            break
        for i in range(n):
            _normalise_many(m, i, True, sums, tol)
    for i in range(n):  # rows exact; then only matrices whose columns are still off need Newton
        _normalise_many(m, i, True, sums, tol)
    col_err = np.empty(count)
    _col_errors(m, col_err, sums)
    for i in range(n):
        for j in range(n):
            src = m[i, j]
            for t in range(count):
                out[t, i, j] = src[t]
    if newton_iters <= 0:
        return
    bad = np.flatnonzero(col_err >= tol)
    if len(bad) > 0:
        _newton_many(out, bad, min(newton_iters, _VECTOR_NEWTON_STEPS), tol)
    h, d, trial, best, ed = np.empty((n, n)), np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    for t in bad:  # what the full steps did not finish: damped Newton, one matrix at a time
        if _col_error(out[t]) >= tol:
            _newton(out[t], newton_iters, tol, h, d, trial, best, ed)


@_jit
def _newton_many(out, idx, n_steps, tol):
    """Full Newton steps on the column potentials of the row-stochastic matrices out[idx] [n, n], vectorised.

    Gathered batch-last [n, n, B]; a matrix whose column error a full step does not reduce keeps its previous
    state (and is left to _newton's line search). Most matrices Sinkhorn leaves above tol are in the quadratic
    phase already: two or three full steps finish them.
    """
    n, size = out.shape[1], len(idx)
    m = np.empty((n, n, size))
    for u in range(size):
        for i in range(n):
            for j in range(n):
                m[i, j, u] = out[idx[u], i, j]
    prev = np.empty_like(m)
    h, d, ed = np.empty((n, n, size)), np.empty((n, size)), np.empty((n, size))
    err, new_err, sums = np.empty(size), np.empty(size), np.empty(size)
    _col_errors(m, err, sums)
    for _ in range(n_steps):
        if err.max() < tol:
            break
        for j in range(n):
            dj = d[j]
            for u in range(size):
                dj[u] = 1.0
            for i in range(n):
                mij = m[i, j]
                for u in range(size):
                    dj[u] -= mij[u]
        _laplacian_many(m, h)
        _solve_spd_many(h, d)
        prev[:] = m
        for u in range(size):  # only small steps (the quadratic phase): a long full step can underflow entries to
            step = 0.0         # exact zeros that no later step recovers; those matrices get the line search
            for j in range(n):
                step = max(step, abs(d[j, u]))
            if not step <= _VECTOR_NEWTON_MAX_STEP:
                err[u] = 0.0  # out of this loop: left to _newton (the caller rechecks every matrix it gathered)
        for j in range(n):
            for u in range(size):
                ed[j, u] = math.exp(d[j, u]) if err[u] >= tol else 1.0
        for i in range(n):
            for j in range(n):
                mij, edj = m[i, j], ed[j]
                for u in range(size):
                    mij[u] *= edj[u]
        for i in range(n):
            _normalise_many(m, i, True, sums, tol)
        for j in range(n):
            _normalise_many(m, j, False, sums, tol)
        for i in range(n):
            _normalise_many(m, i, True, sums, tol)
        _col_errors(m, new_err, sums)
        for u in range(size):
            if err[u] >= tol and not new_err[u] < err[u]:  # no progress (or overflow): undo, leave it to the line search
                for i in range(n):
                    for j in range(n):
                        m[i, j, u] = prev[i, j, u]
                new_err[u] = err[u]
        err[:] = new_err
    for u in range(size):
        for i in range(n):
            for j in range(n):
                out[idx[u], i, j] = m[i, j, u]


@_jit
def _col_errors(m, err, sums):
    """err[t] = max_j |column j sum - 1| of each matrix in m [n, n, T]."""
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
def _shift_to_zero(m, index, row, top):
    """Subtract the max of row (or column) `index` of every matrix in m [n, n, N] from it; top: scratch [N]."""
    n, count = m.shape[0], m.shape[2]
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
def _normalise4(v0, v1, v2, v3, tol):
    """v_a <- v_a / (v0 + v1 + v2 + v3) elementwise, in one pass; returns how many sums were off by >= tol."""
    off = 0
    for t in range(v0.shape[0]):
        total = v0[t] + v1[t] + v2[t] + v3[t]
        off += abs(total - 1.0) >= tol
        inv = 1.0 / total
        v0[t] *= inv
        v1[t] *= inv
        v2[t] *= inv
        v3[t] *= inv
    return off


@_jit
def _normalise_many(m, index, row, sums, tol):
    """Normalise row (or column) `index` of every matrix in m [n, n, N]; returns how many sums were off by >= tol.

    A count, not the max error: an integer sum vectorises where a float max reduction (without nnan) does not.
    n = 4 (mHC's usual stream count) runs as one pass over the four vectors.
    """
    n, count = m.shape[0], m.shape[2]
    if n == 4:
        if row:
            return _normalise4(m[index, 0], m[index, 1], m[index, 2], m[index, 3], tol)
        return _normalise4(m[0, index], m[1, index], m[2, index], m[3, index], tol)
    off = 0
    for t in range(count):
        sums[t] = 0.0
    for a in range(n):
        src = m[index, a] if row else m[a, index]
        for t in range(count):
            sums[t] += src[t]
    for t in range(count):
        off += abs(sums[t] - 1.0) >= tol
    for t in range(count):
        sums[t] = 1.0 / sums[t]
    for a in range(n):
        dst = m[index, a] if row else m[a, index]
        for t in range(count):
            dst[t] *= sums[t]
    return off


def project(logits, n_iters, tol, newton_iters):
    """Logits [N, n, n] float64 -> doubly-stochastic [N, n, n] float64 (rows exact, columns within tol)."""
    m = logits.transpose(1, 2, 0).copy()  # batch-last, and a copy: the steps below overwrite it
    _shift_logits(m)
    out = np.empty_like(logits)
    _balance(np.exp(m, out=m), out, n_iters, tol, newton_iters)
    return out


@_jit
def project_backward(p, g):
    """p, upstream g [N, n, n] float64 -> gradient of the logits [N, n, n]."""
    count, n = p.shape[0], p.shape[1]
    out = np.empty((n, n, count))
    _project_backward_many(p.transpose(1, 2, 0).copy(), g.transpose(1, 2, 0).copy(), out, np.empty((n, n, count)),
                           np.empty((n, count)), np.empty((n, count)))
    return out.transpose(2, 0, 1).copy()


def branch_read_forward(x, t_rows, bias, gate, eps, n_iters, tol, newton_iters):
    """x [N, K, D], t_rows = (flat(x) phi)^T [M, N] -> inp [N, D], mixed [N, K, D], gates [N, 2K], p [N, K, K] f64,
    r [N]. (t comes transposed because phi^T flat^T is the faster matmul on CPU: 15 % here.)

    Per token: r = rsqrt(mean(x^2) + eps), c = bias + gate * t * r, gates = sigmoid(c[:2K]),
    p = Sinkhorn(c[2K:]), inp = gates[:K] x, mixed = p x. Two compiled passes with numpy's vectorised exp
    between them (the per-value exp call in numba cost ~60 us per branch here).
    """
    neg_gate_logits, logits, r = _coefficients(x, t_rows, bias, gate, eps)
    with np.errstate(over="ignore"):  # exp(-c) = inf for very negative gate logits: sigmoid 0, as it should be
        np.exp(neg_gate_logits, out=neg_gate_logits)
    np.exp(logits, out=logits)  # shifted to <= 0: no overflow
    return _balance_and_mix(x, neg_gate_logits, logits, r, n_iters, tol, newton_iters)


@_jit
def _coefficients(x, t_rows, bias, gate, eps):
    """-(gate logits) [N, 2K], shifted H_res logits [K, K, N] f64 (batch-last) and r [N], for branch_read_forward."""
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
    """The rest of branch_read_forward, from exp(-gate logits) and exp(shifted H_res logits)."""
    count, k, dim = x.shape
    inp = np.empty((count, dim), dtype=x.dtype)
    mixed = np.empty_like(x)
    gates = np.empty((count, 2 * k), dtype=x.dtype)
    for n in range(count):
        for j in range(2 * k):
            gates[n, j] = 1.0 / (1.0 + exp_neg[n, j])
    p = np.empty((count, k, k))
    _balance(m, p, n_iters, tol, newton_iters)
    w = np.empty((k + 1, k), dtype=x.dtype)  # [H_pre; H_res] in x's dtype (float64 weights: float64 arithmetic)
    for n in range(count):
        xn, pn = x[n], p[n]
        for s in range(k):
            w[0, s] = gates[n, s]
            for i in range(k):
                w[1 + i, s] = pn[i, s]
        if k == 4:  # the common case: the five outputs in one pass over the four streams
            _mix5(w, xn, inp[n], mixed[n])
            continue
        _mix_row(w[0], xn, inp[n])
        for i in range(k):
            _mix_row(w[1 + i], xn, mixed[n, i])
    return inp, mixed, gates, p, r


@_jit
def _mix5(w, x, inp, mixed):
    """inp = w[0] x, mixed[i] = w[1 + i] x for x [4, D], w [5, 4]: one pass over x (weights held in registers)."""
    a0, a1, a2, a3 = w[0, 0], w[0, 1], w[0, 2], w[0, 3]
    b0, b1, b2, b3 = w[1, 0], w[1, 1], w[1, 2], w[1, 3]
    c0, c1, c2, c3 = w[2, 0], w[2, 1], w[2, 2], w[2, 3]
    d0, d1, d2, d3 = w[3, 0], w[3, 1], w[3, 2], w[3, 3]
    e0, e1, e2, e3 = w[4, 0], w[4, 1], w[4, 2], w[4, 3]
    m0, m1, m2, m3 = mixed[0], mixed[1], mixed[2], mixed[3]
    for e in range(x.shape[1]):
        x0, x1, x2, x3 = x[0, e], x[1, e], x[2, e], x[3, e]
        inp[e] = a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
        m0[e] = b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3
        m1[e] = c0 * x0 + c1 * x1 + c2 * x2 + c3 * x3
        m2[e] = d0 * x0 + d1 * x1 + d2 * x2 + d3 * x3
        m3[e] = e0 * x0 + e1 * x1 + e2 * x2 + e3 * x3


@_jit
def _dots5(xs, gi, gm, g_pre, g_bl, s, u):
    """g_pre[s, u] = <gi, xs>, g_bl[i, s, u] = <gm[i], xs> for gm [4, D]: five reductions in one pass over xs."""
    v = xs[0]
    a0, a1, a2, a3, a4 = gi[0] * v, gm[0, 0] * v, gm[1, 0] * v, gm[2, 0] * v, gm[3, 0] * v
    for e in range(1, xs.shape[0]):
        v = xs[e]
        a0 += gi[e] * v
        a1 += gm[0, e] * v
        a2 += gm[1, e] * v
        a3 += gm[2, e] * v
        a4 += gm[3, e] * v
    g_pre[s, u] = a0
    g_bl[0, s, u] = a1
    g_bl[1, s, u] = a2
    g_bl[2, s, u] = a3
    g_bl[3, s, u] = a4


_TILE = 64  # tokens per tile in the backward: a tile's streams and gradients (~300 KB) stay in L2 between passes


@_jit
def branch_read_backward(x, t_rows, r, gate, gates, p, g_inp, g_mixed, g_post):
    """Gradients of branch_read_forward's outputs -> g_x [N, K, D] (without the x phi term), g_t [N, M], g_bias [M],
    g_alpha [3] (the pre/post/res gates, over coefficients [0, K), [K, 2K), [2K, M) as ManifoldHyperConnections
    groups them).

    The caller adds g_t phi^T to g_x and forms g_phi = flat^T g_t.
    Per tile of tokens: the dot products <g, x_s> per token, then the Sinkhorn backward for the whole tile
    (vectorised across tokens), then g_x in one pass per stream while the tile is still in cache.
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
    w = np.empty(k + 2, dtype=x.dtype)  # per stream: gate, p[:, s], the rms term's scale
    for start in range(0, count, _TILE):
        size = min(_TILE, count - start)
        # g_a[0, s] = <g_inp, x_s> and g_a[1 + i, s] = <g_mixed_i, x_s>, the latter batch-last for the solve
        for u in range(size):
            n = start + u
            xn, gm, gi = x[n], g_mixed[n], g_inp[n]
            for s in range(k):
                if k == 4:  # the common case: the five dot products in one pass over x_s
                    _dots5(xn[s], gi, gm, g_pre, g_bl, s, u)
                else:
                    g_pre[s, u] = _dot(gi, xn[s])
                    for i in range(k):
                        g_bl[i, s, u] = _dot(gm[i], xn[s])
                for i in range(k):
                    p_bl[i, s, u] = p[n, i, s]
        if size < _TILE:  # pad the last tile with harmless matrices (uniform P, zero gradient): no slicing, so
            for i in range(k):  # every call sees contiguous [k, k, _TILE] arrays
                for s in range(k):
                    p_bl[i, s, size:] = 1.0 / k
                    g_bl[i, s, size:] = 0.0
        _project_backward_many(p_bl, g_bl, g_res, h, q_rows, b)
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
            # g_x_s = gates_s g_inp + sum_i p_is g_mixed_i + scale x_s, one pass per stream; the weights go
            # through w (x's dtype) so float32 data is not computed in float64
            for s in range(k):
                out, xs = g_x[n, s], xn[s]
                w[0] = gates[n, s]
                for i in range(k):
                    w[1 + i] = pn[i, s]
                if k == 4:  # the common case, one pass
                    w_in, w0, w1, w2, w3, scale = w[0], w[1], w[2], w[3], w[4], w[5]
                    for e in range(dim):
                        out[e] = (w_in * gi[e] + w0 * gm[0, e] + w1 * gm[1, e] + w2 * gm[2, e] + w3 * gm[3, e]
                                  + scale * xs[e])
                else:
                    w_in, scale = w[0], w[k + 1]
                    for e in range(dim):
                        out[e] = w_in * gi[e] + scale * xs[e]
                    for i in range(k):
                        wi = w[1 + i]
                        for e in range(dim):
                            out[e] += wi * gm[i, e]
    return g_x, g_t, g_bias.astype(x.dtype), g_alpha.astype(x.dtype)


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


def compile_kernels() -> None:
    """Compile (and cache on disk) every kernel for float32 and float64 streams: ~20 s once, then ~0.4 s a process.

    `make setup` runs it, so the first mHC training step does not stall on compilation.
    """
    if not AVAILABLE:
        return
    rng = np.random.default_rng(0)
    k, dim, count = 4, 8, 3
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((count, k, dim)).astype(dtype)
        t_rows = rng.standard_normal((2 * k + k * k, count)).astype(dtype)
        bias, gate = np.zeros(2 * k + k * k, dtype), np.ones(2 * k + k * k, dtype)
        inp, mixed, gates, p, r = branch_read_forward(x, t_rows, bias, gate, 1e-6, 20, 1e-6, 30)
        branch_read_backward(x, t_rows, r, gate, gates, p, inp, mixed, gates[:, k:].copy())
        stream_write(mixed, gates[:, k:].copy(), inp)
        stream_write_backward(mixed, inp, gates[:, k:].copy())
    logits = rng.standard_normal((count, k, k)) * 10
    project_backward(project(logits, 20, 1e-6, 30), logits)
