"""Slow, obvious reference implementations of the integer kernels (int64, numpy only).

Each kernel in qlinear.runtime.kernels is compared against one of these with atol=0.
"""

from __future__ import annotations

import itertools

import numpy as np


def matmul_integer(a: np.ndarray, a_zp, b: np.ndarray, b_zp) -> np.ndarray:
    """(A - a_zp) @ (B - b_zp[n]) in int64, wrapped to int32 like an int32 accumulator."""
    ac = a.astype(np.int64) - np.asarray(a_zp, np.int64)
    bc = b.astype(np.int64) - np.asarray(b_zp, np.int64)
    return np.matmul(ac, bc).astype(np.int32)


def requantize(acc: np.ndarray, mult: np.ndarray, y_zp: int, dtype) -> np.ndarray:
    """saturate(rint(float32(acc) * mult) + y_zp); mult broadcasts over the last axis."""
    info = np.iinfo(dtype)
    v = acc.astype(np.float32) * np.asarray(mult, np.float32)
    return np.clip(np.rint(v).astype(np.int64) + y_zp, info.min, info.max).astype(dtype)


def multiplier(x_scale, w_scale, y_scale) -> np.ndarray:
    """float32(x_scale * w_scale / y_scale) in float32, ORT's order."""
    return (np.float32(x_scale) * np.asarray(w_scale, np.float32)) / np.float32(y_scale)


def conv_integer(x, x_zp, w, w_zp, group=1, strides=None, dilations=None, begin=None,
                 end=None) -> np.ndarray:
    """int32 N-D convolution of (x - x_zp) and (w - w_zp[c_out]), padding with x_zp."""
    nd = x.ndim - 2
    strides = strides or (1,) * nd
    dilations = dilations or (1,) * nd
    begin = begin or (0,) * nd
    end = end or (0,) * nd
    xc = x.astype(np.int64) - int(x_zp)
    xp = np.pad(xc, [(0, 0), (0, 0)] + [(begin[i], end[i]) for i in range(nd)])
    c_out, cg = w.shape[:2]
    k = w.shape[2:]
    wzp = np.broadcast_to(np.asarray(w_zp, np.int64).reshape(-1), (c_out,))
    wc = w.astype(np.int64) - wzp.reshape((-1,) + (1,) * (nd + 1))
    osp = [(x.shape[2 + i] + begin[i] + end[i] - dilations[i] * (k[i] - 1) - 1) // strides[i] + 1
           for i in range(nd)]
    out = np.zeros((x.shape[0], c_out, *osp), np.int64)
    cog = c_out // group
    for kk in itertools.product(*[range(n) for n in k]):
        sl = tuple(slice(kk[i] * dilations[i], kk[i] * dilations[i] + (osp[i] - 1) * strides[i] + 1,
                         strides[i]) for i in range(nd))
        patch = xp[(slice(None), slice(None)) + sl]
        for g in range(group):
            wk = wc[g * cog:(g + 1) * cog][(slice(None), slice(None)) + kk]
            out[:, g * cog:(g + 1) * cog] += np.einsum(
                "bc...,oc->bo...", patch[:, g * cg:(g + 1) * cg], wk)
    return out.astype(np.int32)


def conv_requantized(x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias=None, **geometry):
    """QLinearConv by the book: int32 conv (+ bias), requantize per output channel."""
    acc = conv_integer(x, x_zp, w, w_zp, **geometry)
    if bias is not None:
        acc = (acc.astype(np.int64) + bias.reshape((1, -1) + (1,) * (x.ndim - 2))).astype(np.int32)
    c_out = w.shape[0]
    mult = np.broadcast_to(multiplier(x_scale, w_scale, y_scale).reshape(-1), (c_out,))
    moved = np.moveaxis(acc, 1, -1)
    return np.moveaxis(requantize(moved, mult, int(y_zp), np.asarray(y_zp).dtype), -1, 1)
