"""Channels-last (NHWC) int8 convolution and max pooling: the path optimized CNN graphs run.

Why a separate entry point: in NHWC the channels are the innermost, contiguous dim,
so the implicit-GEMM convolution reads its rows straight from the input (no
NCHW -> channels-last copy; with uint8 input, no padding and channels a multiple of
4 it reads the input itself) and writes its output rows contiguously. Everything
shape-dependent (offsets, column terms, the driver's arguments: `gemm.PackedLaunch`)
is planned once per input shape; padding copies the interior into a reused per-thread
buffer whose border (the input zero point) was written once. Depthwise convolution
runs the register-blocked kernel of depthwise.py straight on x (no padded copy:
taps in the padding read a zero-point vector; a channel copy only when C % 16 != 0 or
the channel multiplier is > 1). Requantization is the shared `requant` arithmetic, so
results are bit-exact with the NCHW kernels and ORT.
"""

from __future__ import annotations

import threading

import numpy as np
from numba import njit

from qlinear.runtime.kernels import config
from qlinear.runtime.kernels.config import JIT
from qlinear.runtime.kernels.conv import (
    BYTE_WORK,
    PackedConv,
    _offsets,
    output_spatial,
)
from qlinear.runtime.kernels.depthwise import (
    DepthwiseLaunch,
    channel_stride,
    channels_last_input,
    needs_copy,
)
from qlinear.runtime.kernels.gemm import ACT_SHIFT, PackedLaunch
from qlinear.runtime.kernels.parallel import claim, finish, recording, run_tasks
from qlinear.runtime.kernels.requant import (
    OUT_FLOAT,
    OUT_INT32,
    OUT_QUANTIZED,
)

_MODES = {np.dtype(np.int32): OUT_INT32, np.dtype(np.float32): OUT_FLOAT}


_U = np.uint64  # unsigned indices: numba then skips negative-index fix-ups and vectorizes


@njit(**JIT)
def _copy_into_padded(counters, x, flip, out, pt, pl, groups, cg, cgp):
    """out[b, pt+i, pl+j, g*cgp + c] = x[b, i, j, g*cg + c] ^ flip, one input row per task.

    Only the interior is written: the spatial border (input zero point) and channel
    padding (0) of the reused buffer were filled once when it was created.
    """
    nb, h, w, c = x.shape
    _, hp, wp, cpix = out.shape
    xf = x.reshape(-1)
    of = out.reshape(-1)
    ntasks = nb * h
    while True:
        task = claim(counters)
        if task >= ntasks:
            break
        bi = task // h
        ih = task - bi * h
        src = _U((bi * h + ih) * w) * _U(c)
        dst = (_U((bi * hp + ih + pt) * wp + pl)) * _U(cpix)
        if cpix == c:
            for i in range(_U(w * c)):
                of[dst + i] = xf[src + i] ^ flip
        else:
            # channel-outer: one long strided loop per channel instead of a few-byte
            # loop per pixel (3-channel images: the per-pixel loop cost 4x more)
            for gg in range(groups):
                for cc in range(cg):
                    d = dst + _U(gg * cgp + cc)
                    sidx = src + _U(gg * cg + cc)
                    for j in range(_U(w)):
                        of[d + j * _U(cpix)] = xf[sidx + j * _U(c)] ^ flip
        finish(counters)


class _ConvPlan:
    """Everything about one (input shape, parameters) of a convolution except the data:
    output shape, driver launch or depthwise arguments, and the padded-buffer layout.

    Padded buffers are reused per thread: their border (the input zero point) and
    channel padding are written once, each call only copies the interior.
    """

    def __init__(self) -> None:
        self.osp: tuple[int, int] = (0, 0)
        self.kind = "gemm"
        self.launch = None
        self.dw: DepthwiseLaunch | None = None
        self.dw_multiplier = 0  # > 0: copy x (channels repeated this often) for `dw`
        self.buf_shape: tuple[int, ...] | None = None  # None: read x as it is
        self.fill: np.ndarray | None = None  # one padded pixel: zp on channels, 0 on pads
        self.pads = (0, 0)
        self.groups = 1
        self.cg = 0
        self.cgp = 0
        self.flip = np.uint8(0)
        self.out_dtype = np.dtype(np.int32)
        self.buffers: dict[int, np.ndarray] = {}

    def buffer(self, x8: np.ndarray) -> np.ndarray:
        """x8 (uint8 NHWC) as the buffer the kernel reads: x8 itself, or a padded copy."""
        if self.buf_shape is None:
            return x8
        # a recorded call gets a buffer of its own: its replay may run beside this thread
        private = recording()
        tid = threading.get_ident()
        buf = None if private else self.buffers.get(tid)
        if buf is None:
            buf = np.empty(self.buf_shape, np.uint8)
            buf.reshape(-1, self.fill.size)[:] = self.fill
            if len(self.buffers) > 8:
                self.buffers.clear()
            if not private:
                self.buffers[tid] = buf
        b, h, w, _ = x8.shape
        run_tasks(
            _copy_into_padded,
            b * h,
            x8.size * BYTE_WORK,
            x8,
            self.flip,
            buf,
            np.int64(self.pads[0]),
            np.int64(self.pads[1]),
            np.int64(self.groups),
            np.int64(self.cg),
            np.int64(self.cgp),
        )
        return buf


def _plan(
    x: np.ndarray,
    x_zp: int,
    packed: PackedConv,
    strides: tuple[int, int],
    dilations: tuple[int, int],
    begin: tuple[int, int],
    end: tuple[int, int],
    out_dtype: np.dtype,
    bias: np.ndarray | None,
    mult: np.ndarray | None,
    y_zp: int,
) -> _ConvPlan:
    b, h, w, _ = x.shape
    osp = output_spatial((h, w), packed.kernel, strides, dilations, begin, end)
    if min(osp) <= 0:
        raise ValueError(f"convolution output would be empty: {osp}")
    mode = _MODES.get(out_dtype, OUT_QUANTIZED)
    if mode == OUT_FLOAT:
        raise ValueError("float output is not supported by the NHWC int8 convolution")
    c_out = packed.c_out
    info = np.iinfo(out_dtype) if mode == OUT_QUANTIZED else np.iinfo(np.uint8)
    shift = ACT_SHIFT[x.dtype]
    zp_u8 = int(x_zp) + shift
    mult32 = (
        np.zeros(c_out, np.float32)
        if mult is None
        else np.ascontiguousarray(
            np.broadcast_to(np.asarray(mult, np.float32).reshape(-1), (c_out,))
        )
    )
    plan = _ConvPlan()
    plan.osp = osp
    plan.flip = np.uint8(0x80 if shift else 0)
    plan.pads = (begin[0], begin[1])
    padded = any(begin) or any(end)
    hp, wp = h + begin[0] + end[0], w + begin[1] + end[1]
    if packed.centered is not None:
        # depthwise (any channel multiplier): the register-blocked kernel reads x in place
        # (padding handled per tap) unless its channels need a copy
        mpg = c_out // packed.groups
        plan.kind = "dw"
        in_shape = (b, h, w, c_out)
        if needs_copy(packed.c_in, mpg):
            plan.dw_multiplier = mpg
            in_shape = (b, h, w, channel_stride(c_out))
        plan.dw = DepthwiseLaunch(
            packed.centered, packed.kernel, strides, dilations, begin, in_shape, osp,
            x_zp=int(x_zp), signed=x.dtype == np.int8, mode=mode, bias=bias, mult=mult,
            y_zp=int(y_zp), q_range=(int(info.min), int(info.max)))
        return plan
    pw = packed.gemm
    if pw is None:
        raise ValueError("convolution weights were packed without their GEMM form")
    cgp = pw.c4 * 4
    groups = packed.groups
    cg = packed.c_in // groups
    plan.groups, plan.cg, plan.cgp = groups, cg, cgp
    if padded or cgp != cg or shift:
        plan.buf_shape = (b, hp, wp, groups * cgp)
        fill = np.zeros((groups, cgp), np.uint8)
        fill[:, :cg] = zp_u8
        plan.fill = fill.reshape(-1)
    else:
        hp, wp = h, w
    pix_bytes = groups * cgp
    steps = (wp * pix_bytes, pix_bytes)
    taps = _offsets(packed.kernel, [d * s for d, s in zip(dilations, steps, strict=True)])
    row_off = (
        np.arange(b, dtype=np.int64)[:, None] * (hp * wp * pix_bytes)
        + _offsets(osp, [st * s for st, s in zip(strides, steps, strict=True)])[None, :]
    ).reshape(-1)
    plan.launch = PackedLaunch(
        row_off,
        cgp,
        taps,
        zp_u8,
        pw,
        mode=mode,
        out_row_off=np.arange(row_off.shape[0], dtype=np.int64) * c_out,
        out_col_stride=1,
        bias=bias,
        mult=None if mult is None else mult32,
        y_zp=int(y_zp),
        q_range=(int(info.min), int(info.max)),
    )
    return plan


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
) -> np.ndarray:
    """2-D convolution of x [B, H, W, C] (uint8/int8) with prepacked weights -> [B, OH, OW, M].

    out_dtype int32 (ConvInteger) or uint8/int8 (requantized with `mult`, `y_zp`);
    `bias` is int32 per output channel, added to the accumulator. Depthwise packed
    weights (`packed.centered`) run the depthwise kernel; otherwise `packed.gemm` is used.
    Everything that depends only on shapes and parameters is planned once per input
    shape (memoized on `packed`), so a call is one copy (only when padding is needed)
    and one numba launch.
    """
    plan = conv_nhwc_plan(x, x_zp, packed, strides, dilations, begin, end,
                          out_dtype=out_dtype, bias=bias, mult=mult, y_zp=y_zp)
    return run_conv_plan(plan, x, packed.c_out)


def conv_nhwc_plan(
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
) -> _ConvPlan:
    """The plan of `conv_nhwc` for x's shape and dtype (memoized on `packed`). Callers
    whose parameters are all constant keep it per input shape and call `run_conv_plan`:
    the memo key hashes the bias and multipliers, ~2 us per call."""
    if x.dtype not in ACT_SHIFT:
        raise TypeError(f"conv input must be uint8 or int8, got {x.dtype}")
    if x.ndim != 4 or x.shape[3] != packed.c_in:
        raise ValueError(f"NHWC input {x.shape} does not match weights (C_in={packed.c_in})")
    out_dtype = np.dtype(out_dtype)
    key = (x.shape, x.dtype.str, strides, dilations, begin, end, out_dtype.str, int(x_zp),
           int(y_zp), config.kernel_choice(),
           None if bias is None else np.asarray(bias).tobytes(),
           None if mult is None else np.asarray(mult).tobytes())
    plan = packed.memo.get(key)
    if plan is None:
        plan = _plan(x, x_zp, packed, strides, dilations, begin, end, out_dtype, bias, mult,
                     y_zp)
        plan.out_dtype = out_dtype
        if len(packed.memo) > 32:
            packed.memo.clear()
        packed.memo[key] = plan
    return plan


def run_conv_plan(plan: _ConvPlan, x: np.ndarray, c_out: int) -> np.ndarray:
    """One convolution of x (the shape and dtype the plan was made for)."""
    out = np.empty((x.shape[0], *plan.osp, c_out), plan.out_dtype)
    xc = x if x.flags.c_contiguous else np.ascontiguousarray(x)
    if plan.kind == "gemm":
        buf = plan.buffer(xc.view(np.uint8))
        plan.launch.run(buf.reshape(-1), out.reshape(-1))
        return out
    x8 = xc.view(np.uint8)
    plan.dw.run(channels_last_input(x8, plan.dw_multiplier) if plan.dw_multiplier else x8, out)
    return out


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
        b * oh * ow * c * kernel[0] * kernel[1] * BYTE_WORK,  # a byte max, not a MAC
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
    xf = x.reshape(-1)
    of = out.reshape(-1)
    low = lowest[0]
    cu = _U(c_n)
    while True:
        task = claim(counters)
        if task >= nb * oh_n:
            break
        bi = task // oh_n
        oh = task - bi * oh_n
        for ow in range(ow_n):
            dst = _U((task * ow_n + ow) * c_n)
            for c in range(cu):
                of[dst + c] = low
            for a in range(kh):
                ih = oh * sh - pt + a * dh
                if ih < 0 or ih >= h:
                    continue
                for bb in range(kw):
                    iw = ow * sw - pl + bb * dw
                    if iw < 0 or iw >= w:
                        continue
                    src = _U(((bi * h + ih) * w + iw) * c_n)
                    for c in range(cu):  # a select, not a conditional store: vectorizes
                        v = xf[src + c]
                        m = of[dst + c]
                        of[dst + c] = v if v > m else m
        finish(counters)
