"""numba loops for float NN ops where numpy would need many passes over memory.

Depthwise convolution is the main one: with im2col it degenerates into C tiny
GEMMs, and as k*k numpy multiply-adds it streams the output k*k times. A single
fused loop reads each input row once per kernel tap and vectorizes along width.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, fastmath=True)
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
    for n in range(n_batch):
        for m in range(m_out):
            c = m // mult
            bv = bias[m]
            for i in range(oh):
                row = out[n, m, i]
                for j in range(ow):
                    row[j] = bv
                for a in range(kh):
                    xr = xp[n, c, i * sh + a * dh]
                    for b in range(kw):
                        wv = w[m, a, b]
                        off = b * dw
                        if sw == 1:
                            for j in range(ow):
                                row[j] += wv * xr[off + j]
                        else:
                            for j in range(ow):
                                row[j] += wv * xr[off + j * sw]


@njit(cache=True, fastmath=True)
def layer_norm_rows(
    x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float, y: np.ndarray,
    mean_out: np.ndarray, inv_out: np.ndarray,
) -> None:
    """Row-wise LayerNorm of a 2-D [rows, cols] array in two passes per row (float accumulators)."""
    rows, cols = x.shape
    for r in range(rows):
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
