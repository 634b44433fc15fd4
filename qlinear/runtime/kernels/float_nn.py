"""numba loops for float NN ops where numpy would need many passes over memory.

Depthwise convolution and 2-D pooling: numpy does them as k*k strided passes over
the output (and im2col degenerates into C tiny GEMMs); a fused loop reads each input
row once per tap and vectorizes along the width when the stride is 1. Row-wise
LayerNorm keeps a row in cache across its passes. (Softmax stays in numpy: a fused
numba row kernel with a branch-free float64 exp measured 0.49 ms vs numpy's 0.35 ms on
1536x128 float32; numba's math.exp is scalar, numpy's is SIMD.) Float paths may use
fastmath: results only need to match within float tolerance.

Parallelism: each kernel claims (batch, channel) planes or row blocks from the shared
work-sharing pool (`parallel.run_tasks`), never numba prange. prange ends in a barrier
that waits for every OpenMP thread to get a core; right after an int8 GEMM the pool's
helper is still spinning on the other core, so a prange LayerNorm measured 4 ms in the
graph vs 0.04 ms alone. Small calls run on the calling thread only.

Float GEMMs (MatMul/Gemm/Conv via numpy) keep OpenBLAS's own thread pool. Measured
alternatives, interleaved on the shared 2-core machine (median ms, float BERT /
ResNet-18 b=1): OpenBLAS 2 threads 34.1 / 50.1; our pool running column blocks as
1-thread BLAS calls (Python tasks, GIL released in BLAS) 36.4 / 56.7, 47.4 / 61.2 when
toggling BLAS threads per call; BLAS capped at 1 thread 48.4 / 58.8. So no cap and
no extra dependency: our pool never waits on a barrier, so the worst case when
OpenBLAS's workers still spin is a kernel running on the calling thread alone.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from qlinear.runtime.kernels.parallel import claim, finish, run_tasks

_FLOAT_JIT = {"cache": True, "fastmath": True, "nogil": True}


@njit(**_FLOAT_JIT)
def _depthwise_conv2d(
    counters: np.ndarray,
    xp: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray,
    sh: int,
    sw: int,
    dh: int,
    dw: int,
    out: np.ndarray,
) -> None:
    """out[n, m] = bias[m] + sum_ab w[m, a, b] * xp[n, m // mult, i*sh + a*dh, j*sw + b*dw].

    xp is the already padded input [N, C, Hp, Wp]; w is [M, kh, kw] with M = C * mult.
    """
    n_batch, m_out, oh, ow = out.shape
    c_in = xp.shape[1]
    mult = m_out // c_in
    kh = w.shape[1]
    kw = w.shape[2]
    ntasks = n_batch * m_out
    while True:
        nm = claim(counters)
        if nm >= ntasks:
            break
        n = nm // m_out
        m = nm % m_out
        c = m // mult
        xc = xp[n, c]
        bv = bias[m]
        acc = np.empty(ow, dtype=out.dtype)
        for i in range(oh):
            for j in range(ow):
                acc[j] = bv
            for a in range(kh):
                xr = xc[i * sh + a * dh]
                for b in range(kw):
                    wv = w[m, a, b]
                    if sw == 1:
                        xs = xr[b * dw : b * dw + ow]
                        for j in range(ow):
                            acc[j] += wv * xs[j]
                    else:
                        xt = xr[b * dw : b * dw + (ow - 1) * sw + 1 : sw]
                        for j in range(ow):
                            acc[j] += wv * xt[j]
            row = out[n, m, i]
            for j in range(ow):
                row[j] = acc[j]
        finish(counters)


@njit(**_FLOAT_JIT)
def _max_pool2d(
    counters: np.ndarray, xp: np.ndarray, kh: int, kw: int, sh: int, sw: int, dh: int,
    dw: int, out: np.ndarray,
) -> None:
    """out[n, c, i, j] = max over taps of xp (padded with -inf / dtype min)."""
    n_batch, ch, oh, ow = out.shape
    ntasks = n_batch * ch
    while True:
        nc = claim(counters)
        if nc >= ntasks:
            break
        n = nc // ch
        c = nc % ch
        xc = xp[n, c]
        acc = np.empty(ow, dtype=out.dtype)
        for i in range(oh):
            first = True
            for a in range(kh):
                xr = xc[i * sh + a * dh]
                for b in range(kw):
                    xt = xr[b * dw : b * dw + (ow - 1) * sw + 1 : sw]
                    if first:
                        for j in range(ow):
                            acc[j] = xt[j]
                        first = False
                    else:
                        for j in range(ow):
                            v = xt[j]
                            if v > acc[j]:
                                acc[j] = v
            row = out[n, c, i]
            for j in range(ow):
                row[j] = acc[j]
        finish(counters)


@njit(**_FLOAT_JIT)
def _sum_pool2d(
    counters: np.ndarray,
    xp: np.ndarray,
    kh: int,
    kw: int,
    sh: int,
    sw: int,
    dh: int,
    dw: int,
    inv_count: np.ndarray,
    out: np.ndarray,
) -> None:
    """out[n, c, i, j] = inv_count[i, j] * sum over taps of xp (zero padded)."""
    n_batch, ch, oh, ow = out.shape
    ntasks = n_batch * ch
    while True:
        nc = claim(counters)
        if nc >= ntasks:
            break
        n = nc // ch
        c = nc % ch
        xc = xp[n, c]
        acc = np.empty(ow, dtype=out.dtype)
        for i in range(oh):
            for j in range(ow):
                acc[j] = 0.0
            for a in range(kh):
                xr = xc[i * sh + a * dh]
                for b in range(kw):
                    xt = xr[b * dw : b * dw + (ow - 1) * sw + 1 : sw]
                    for j in range(ow):
                        acc[j] += xt[j]
            row = out[n, c, i]
            ic = inv_count[i]
            for j in range(ow):
                row[j] = acc[j] * ic[j]
        finish(counters)


#: Rows of LayerNorm per claimed task.
_LN_ROWS = 16


@njit(**_FLOAT_JIT)
def layer_norm_row(xr, scale, bias, eps, yr):  # pragma: no cover
    """One row of LayerNorm (two-pass mean/variance in float64); returns (mean, 1/std).

    The quantized LayerNorm (`qlayernorm`) calls this same function on float32 rows of
    the same types, so fused and unfused plans give the same bits (tested on BERT).
    """
    cols = xr.shape[0]
    s = 0.0
    for j in range(cols):
        s += xr[j]
    mu = s / cols
    v = 0.0
    for j in range(cols):
        d = xr[j] - mu
        v += d * d
    inv = 1.0 / np.sqrt(v / cols + eps)
    # normalized in float64 like ORT's CPU kernel (which divides by the float64 std)
    for j in range(cols):
        yr[j] = (xr[j] - mu) * inv * scale[j] + bias[j]
    return mu, inv


@njit(**_FLOAT_JIT)
def _layer_norm_rows(counters, x, scale, bias, eps, y, mean_out, inv_out):  # pragma: no cover
    rows = x.shape[0]
    ntasks = (rows + _LN_ROWS - 1) // _LN_ROWS
    while True:
        t = claim(counters)
        if t >= ntasks:
            break
        for r in range(t * _LN_ROWS, min(rows, (t + 1) * _LN_ROWS)):
            mu, inv = layer_norm_row(x[r], scale, bias, eps, y[r])
            mean_out[r] = mu
            inv_out[r] = inv
        finish(counters)


def depthwise_conv2d(
    xp: np.ndarray, w: np.ndarray, bias: np.ndarray, sh: int, sw: int, dh: int, dw: int,
    out: np.ndarray,
) -> None:
    """out[n, m] = bias[m] + sum_ab w[m, a, b] * xp[n, m // mult, i*sh + a*dh, j*sw + b*dw].

    xp is the already padded input [N, C, Hp, Wp]; w is [M, kh, kw] with M = C * mult.
    """
    n, m = out.shape[0], out.shape[1]
    work = out.size * w.shape[1] * w.shape[2]
    run_tasks(_depthwise_conv2d, n * m, work, xp, w, bias, sh, sw, dh, dw, out)


def max_pool2d(
    xp: np.ndarray, kh: int, kw: int, sh: int, sw: int, dh: int, dw: int, out: np.ndarray
) -> None:
    """out[n, c, i, j] = max over taps of xp (padded with -inf / dtype min)."""
    run_tasks(_max_pool2d, out.shape[0] * out.shape[1], out.size * kh * kw, xp, kh, kw, sh,
              sw, dh, dw, out)


def sum_pool2d(
    xp: np.ndarray, kh: int, kw: int, sh: int, sw: int, dh: int, dw: int,
    inv_count: np.ndarray, out: np.ndarray,
) -> None:
    """out[n, c, i, j] = inv_count[i, j] * sum over taps of xp (zero padded)."""
    run_tasks(_sum_pool2d, out.shape[0] * out.shape[1], out.size * kh * kw, xp, kh, kw, sh,
              sw, dh, dw, inv_count, out)


def layer_norm_rows(
    x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float, y: np.ndarray,
    mean_out: np.ndarray, inv_out: np.ndarray,
) -> None:
    """Row-wise LayerNorm of a 2-D [rows, cols] array (two-pass mean/variance per row)."""
    rows = x.shape[0]
    run_tasks(_layer_norm_rows, -(-rows // _LN_ROWS), x.size * 8, x, scale, bias, eps, y,
              mean_out, inv_out)
