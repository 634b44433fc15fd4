"""Channels-last (NHWC) int8 convolution and max pooling.

Why a separate entry point: in NHWC the channels are the innermost, contiguous dim,
so the implicit-GEMM convolution reads its rows straight from the input (no
NCHW -> channels-last copy; with uint8 input, no padding and channels a multiple of
4 it reads the input itself) and writes its output rows contiguously. The general
path reuses the shared GEMM driver (`gemm.run_packed`) and weight packing
(`conv.pack_conv_weights`); depthwise and max pooling have their own loops here,
vectorized over channels. Requantization is `requant.requantize_value`, the one
every quantized op uses, so results are bit-exact with the NCHW kernels.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from qlinear.runtime.kernels.config import JIT
from qlinear.runtime.kernels.conv import PackedConv, output_spatial
from qlinear.runtime.kernels.gemm import ACT_SHIFT, run_packed
from qlinear.runtime.kernels.parallel import claim, finish, run_tasks
from qlinear.runtime.kernels.requant import (
    OUT_FLOAT,
    OUT_INT32,
    OUT_QUANTIZED,
    requantize_value,
)

_MODES = {np.dtype(np.int32): OUT_INT32, np.dtype(np.float32): OUT_FLOAT}


def depthwise_weights(w: np.ndarray, w_zp: np.ndarray, groups: int) -> np.ndarray | None:
    """Centered 2-D depthwise weights as int32 [taps, C_out] (channels innermost), or None
    when the convolution is not depthwise (then the GEMM path runs)."""
    c_out, cg = w.shape[:2]
    if cg != 1 or groups <= 1 or w.ndim != 4:
        return None
    zp = np.broadcast_to(np.asarray(w_zp, np.int32).reshape(-1), (c_out,))
    centered = w.reshape(c_out, -1).astype(np.int32) - zp[:, None]
    return np.ascontiguousarray(centered.T)


def _padded_nhwc(x8: np.ndarray, groups: int, cgp: int, begin, end, fill: int) -> np.ndarray:
    """uint8 [B, H, W, C] -> [B, Hp, Wp, G, cgp]: spatial pads hold `fill`, channel pads 0."""
    b, h, w, c = x8.shape
    cg = c // groups
    buf = np.empty((b, h + begin[0] + end[0], w + begin[1] + end[1], groups, cgp), np.uint8)
    if any(begin) or any(end):
        buf[..., :cg] = fill
    if cgp > cg:
        buf[..., cg:] = 0
    buf[:, begin[0] : begin[0] + h, begin[1] : begin[1] + w, :, :cg] = x8.reshape(
        b, h, w, groups, cg
    )
    return buf


def _offsets(counts, steps) -> np.ndarray:
    off = np.zeros(1, np.int64)
    for n, s in zip(counts, steps, strict=True):
        off = (off[:, None] + np.arange(n, dtype=np.int64)[None, :] * s).reshape(-1)
    return off


def conv_nhwc(
    x: np.ndarray,
    x_zp: int,
    packed: PackedConv,
    strides: tuple[int, int],
    dilations: tuple[int, int],
    begin: tuple[int, int],
    end: tuple[int, int],
    *,
    out_dtype: type = np.int32,
    bias: np.ndarray | None = None,
    mult: np.ndarray | None = None,
    y_zp: int = 0,
    dw_weights: np.ndarray | None = None,
) -> np.ndarray:
    """2-D convolution of x [B, H, W, C] (uint8/int8) with prepacked weights -> [B, OH, OW, M].

    out_dtype int32 (ConvInteger) or uint8/int8 (requantized with `mult`, `y_zp`);
    `bias` is int32 per output channel, added to the accumulator. Depthwise weights
    (`depthwise_weights`) select the depthwise loop; otherwise `packed.gemm` is used.
    """
    if x.dtype not in ACT_SHIFT:
        raise TypeError(f"conv input must be uint8 or int8, got {x.dtype}")
    if x.ndim != 4 or x.shape[3] != packed.c_in:
        raise ValueError(f"NHWC input {x.shape} does not match weights (C_in={packed.c_in})")
    b, h, w, _ = x.shape
    osp = output_spatial((h, w), packed.kernel, strides, dilations, begin, end)
    if min(osp) <= 0:
        raise ValueError(f"convolution output would be empty: {osp}")
    out_dtype = np.dtype(out_dtype)
    mode = _MODES.get(out_dtype, OUT_QUANTIZED)
    if mode == OUT_FLOAT:
        raise ValueError("float output is not supported by the NHWC int8 convolution")
    c_out = packed.c_out
    out = np.empty((b, *osp, c_out), out_dtype)
    info = np.iinfo(out_dtype) if mode == OUT_QUANTIZED else np.iinfo(np.uint8)
    col = (
        np.zeros(c_out, np.int32)
        if bias is None
        else np.ascontiguousarray(np.broadcast_to(np.asarray(bias, np.int32).reshape(-1), (c_out,)))
    )
    mult32 = (
        np.zeros(c_out, np.float32)
        if mult is None
        else np.ascontiguousarray(
            np.broadcast_to(np.asarray(mult, np.float32).reshape(-1), (c_out,))
        )
    )
    if dw_weights is not None:
        xc = np.ascontiguousarray(x)
        run_tasks(
            _depthwise_nhwc,
            b * osp[0],
            b * osp[0] * osp[1] * dw_weights.size,
            xc,
            np.int32(x_zp),
            dw_weights,
            np.int64(packed.kernel[0]),
            np.int64(packed.kernel[1]),
            np.int64(strides[0]),
            np.int64(strides[1]),
            np.int64(dilations[0]),
            np.int64(dilations[1]),
            np.int64(begin[0]),
            np.int64(begin[1]),
            col,
            np.int64(mode),
            out.reshape(b, osp[0], osp[1], c_out) if mode == OUT_INT32 else _EMPTY4_I32,
            out.view(np.uint8) if mode == OUT_QUANTIZED else _EMPTY4_U8,
            mult32,
            np.int64(y_zp),
            np.int64(info.min),
            np.int64(info.max),
        )
        return out
    pw = packed.gemm
    if pw is None:
        raise ValueError("depthwise convolution needs its depthwise_weights")
    cgp = pw.c4 * 4
    groups = packed.groups
    cg = packed.c_in // groups
    shift = ACT_SHIFT[x.dtype]
    x8 = np.ascontiguousarray(x).view(np.uint8)
    if shift:
        x8 = x8 ^ np.uint8(0x80)
    if any(begin) or any(end) or cgp != cg:
        buf = _padded_nhwc(x8, groups, cgp, begin, end, int(x_zp) + shift)
    else:
        buf = x8  # already the channels-last buffer the driver reads
    hp, wp = h + begin[0] + end[0], w + begin[1] + end[1]
    pix_bytes = groups * cgp
    steps = (wp * pix_bytes, pix_bytes)
    taps = _offsets(packed.kernel, [d * s for d, s in zip(dilations, steps, strict=True)])
    row_off = (
        np.arange(b, dtype=np.int64)[:, None] * (hp * wp * pix_bytes)
        + _offsets(osp, [st * s for st, s in zip(strides, steps, strict=True)])[None, :]
    ).reshape(-1)
    out_row_off = np.arange(row_off.shape[0], dtype=np.int64) * c_out
    run_packed(
        buf.reshape(-1),
        row_off,
        cgp,
        taps,
        int(x_zp) + shift,
        pw,
        mode=mode,
        out=out.reshape(-1),
        out_row_off=out_row_off,
        out_col_stride=1,
        bias=bias,
        mult=None if mult is None else mult32,
        y_zp=int(y_zp),
        q_range=(int(info.min), int(info.max)),
    )
    return out


_EMPTY4_I32 = np.zeros((0, 0, 0, 0), np.int32)
_EMPTY4_U8 = np.zeros((0, 0, 0, 0), np.uint8)


@njit(**JIT)
def _depthwise_nhwc(
    counters,
    x,
    x_zp,
    wt,
    kh,
    kw,
    sh,
    sw,
    dh,
    dw,
    pt,
    pl,
    col,
    mode,
    out_i32,
    out_q,
    mult,
    y_zp,
    q_lo,
    q_hi,
):
    """Depthwise conv on NHWC rows: one task per (image, output row), channels innermost.

    `wt` [kh*kw, C_out] is centered per output channel (w - w_zp[c]); taps that fall
    in the padding are skipped, which is padding with the input zero point.
    """
    nb, h, w, c_in = x.shape
    c_out = wt.shape[1]
    mpg = c_out // c_in
    oh_n = out_q.shape[1] if mode == 1 else out_i32.shape[1]
    ow_n = out_q.shape[2] if mode == 1 else out_i32.shape[2]
    lo = np.float32(q_lo - y_zp)
    hi = np.float32(q_hi - y_zp)
    zp = np.int32(y_zp)
    acc = np.empty(c_out, np.int32)
    while True:
        task = claim(counters)
        if task >= nb * oh_n:
            break
        bi = task // oh_n
        oh = task - bi * oh_n
        for ow in range(ow_n):
            for c in range(c_out):
                acc[c] = col[c]
            for a in range(kh):
                ih = oh * sh - pt + a * dh
                if ih < 0 or ih >= h:
                    continue
                for bb in range(kw):
                    iw = ow * sw - pl + bb * dw
                    if iw < 0 or iw >= w:
                        continue
                    t = a * kw + bb
                    if mpg == 1:
                        for c in range(c_out):
                            acc[c] += (np.int32(x[bi, ih, iw, c]) - x_zp) * wt[t, c]
                    else:
                        for c in range(c_out):
                            acc[c] += (np.int32(x[bi, ih, iw, c // mpg]) - x_zp) * wt[t, c]
            if mode == 0:
                for c in range(c_out):
                    out_i32[bi, oh, ow, c] = acc[c]
            else:
                for c in range(c_out):
                    q = requantize_value(acc[c], mult[c], zp, lo, hi)
                    out_q[bi, oh, ow, c] = np.uint8(q & 0xFF)
        finish(counters)


def pool_output(
    in_sp: tuple[int, int],
    kernel: tuple[int, int],
    strides: tuple[int, int],
    dilations: tuple[int, int],
    begin: tuple[int, int],
    end: tuple[int, int],
    ceil_mode: bool,
) -> tuple[int, int]:
    """ONNX pooling output size (ceil mode drops a last window starting in the tail pad)."""
    out = []
    for i in range(2):
        span = in_sp[i] + begin[i] + end[i] - ((kernel[i] - 1) * dilations[i] + 1)
        if ceil_mode:
            o = -(-span // strides[i]) + 1
            if (o - 1) * strides[i] >= in_sp[i] + begin[i]:
                o -= 1
        else:
            o = span // strides[i] + 1
        out.append(max(o, 0))
    return out[0], out[1]


def max_pool_nhwc(
    x: np.ndarray,
    kernel: tuple[int, int],
    strides: tuple[int, int],
    dilations: tuple[int, int],
    begin: tuple[int, int],
    end: tuple[int, int],
    ceil_mode: bool = False,
) -> np.ndarray:
    """2-D max pooling of x [B, H, W, C] (any integer or float dtype); pads never win."""
    b, h, w, c = x.shape
    oh, ow = pool_output((h, w), kernel, strides, dilations, begin, end, ceil_mode)
    out = np.empty((b, oh, ow, c), x.dtype)
    lowest = np.iinfo(x.dtype).min if x.dtype.kind in "iu" else -np.inf
    run_tasks(
        _max_pool_nhwc,
        b * oh,
        b * oh * ow * c * kernel[0] * kernel[1],
        np.ascontiguousarray(x),
        out,
        np.int64(kernel[0]),
        np.int64(kernel[1]),
        np.int64(strides[0]),
        np.int64(strides[1]),
        np.int64(dilations[0]),
        np.int64(dilations[1]),
        np.int64(begin[0]),
        np.int64(begin[1]),
        np.array([lowest], x.dtype),
    )
    return out


@njit(**JIT)
def _max_pool_nhwc(counters, x, out, kh, kw, sh, sw, dh, dw, pt, pl, lowest):
    """One task per (image, output row); the running max is a channel vector."""
    nb, h, w, c_n = x.shape
    oh_n, ow_n = out.shape[1], out.shape[2]
    while True:
        task = claim(counters)
        if task >= nb * oh_n:
            break
        bi = task // oh_n
        oh = task - bi * oh_n
        for ow in range(ow_n):
            for c in range(c_n):
                out[bi, oh, ow, c] = lowest[0]
            for a in range(kh):
                ih = oh * sh - pt + a * dh
                if ih < 0 or ih >= h:
                    continue
                for bb in range(kw):
                    iw = ow * sw - pl + bb * dw
                    if iw < 0 or iw >= w:
                        continue
                    for c in range(c_n):
                        v = x[bi, ih, iw, c]
                        if v > out[bi, oh, ow, c]:
                            out[bi, oh, ow, c] = v
        finish(counters)
