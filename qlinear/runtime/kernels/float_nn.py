"""numba loops for float NN ops where numpy would need many passes over memory.

Depthwise convolution and 2-D pooling: numpy does them as k*k strided passes over
the output (and im2col degenerates into C tiny GEMMs); a fused loop reads each input
row once per tap and vectorizes along the width when the stride is 1. Row-wise
LayerNorm keeps a row in cache across its passes. (Softmax stays in numpy: numba's
exp is scalar, numpy's is SIMD.) All are parallel over
(batch, channel) or rows with numba's prange (float paths may use fastmath: results
only need to match within float tolerance).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_FLOAT_JIT = {"cache": True, "fastmath": True, "nogil": True, "parallel": True}


@njit(**_FLOAT_JIT)
def depthwise_conv2d(
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
    for nm in prange(n_batch * m_out):
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


@njit(**_FLOAT_JIT)
def max_pool2d(
    xp: np.ndarray, kh: int, kw: int, sh: int, sw: int, dh: int, dw: int, out: np.ndarray
) -> None:
    """out[n, c, i, j] = max over taps of xp (padded with -inf / dtype min)."""
    n_batch, ch, oh, ow = out.shape
    for nc in prange(n_batch * ch):
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


@njit(**_FLOAT_JIT)
def sum_pool2d(
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
    for nc in prange(n_batch * ch):
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


@njit(**_FLOAT_JIT)
def layer_norm_rows(
    x: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray,
    eps: float,
    y: np.ndarray,
    mean_out: np.ndarray,
    inv_out: np.ndarray,
) -> None:
    """Row-wise LayerNorm of a 2-D [rows, cols] array (two-pass mean/variance per row)."""
    rows, cols = x.shape
    for r in prange(rows):
        xr = x[r]
        s = 0.0
        for j in range(cols):
            s += xr[j]
        mu = s / cols
        v = 0.0
        for j in range(cols):
            d = xr[j] - mu
            v += d * d
        inv = 1.0 / np.sqrt(v / cols + eps)
        yr = y[r]
        for j in range(cols):
            yr[j] = (xr[j] - mu) * inv * scale[j] + bias[j]
        mean_out[r] = mu
        inv_out[r] = inv
