"""Float NN ops (CNN / BERT / ViT): Conv, Gemm, MatMul, Softmax, norms, pools, Pad, Resize.

Heavy lifting goes to BLAS through numpy matmul (Conv via im2col views); the rest is
vectorized numpy with as few passes over memory as practical. Half-precision inputs
are computed in float32 and cast back, because numpy has no fast float16 GEMM and
float16 accumulation loses accuracy.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from qlinear.runtime.kernels import float_nn
from qlinear.runtime.registry import Kernel, NodeSpec, register

_HALF = {np.dtype(np.float16)}
try:  # bfloat16 from ml_dtypes, if present
    import ml_dtypes

    _HALF.add(np.dtype(ml_dtypes.bfloat16))
except ImportError:  # pragma: no cover
    pass


def _work_dtype(dt: np.dtype) -> np.dtype:
    """float32 for half types (computed wide, cast back), otherwise the dtype itself."""
    return np.dtype(np.float32) if dt in _HALF else dt


def _up(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) if x.dtype in _HALF else x


def _ints(v: Any) -> list[int] | None:
    return None if v is None else [int(i) for i in v]


# --------------------------------------------------------------------------- padding math


def _spatial_pads(
    auto_pad: str,
    pads: list[int] | None,
    in_sp: Sequence[int],
    k: Sequence[int],
    s: Sequence[int],
    d: Sequence[int],
) -> tuple[list[int], list[int]]:
    """(head pads, tail pads) per spatial axis, resolving auto_pad against the input shape."""
    n = len(in_sp)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        head, tail = [], []
        for i in range(n):
            out = -(-in_sp[i] // s[i])
            total = max(0, (out - 1) * s[i] + (k[i] - 1) * d[i] + 1 - in_sp[i])
            small = total // 2
            if auto_pad == "SAME_UPPER":
                head.append(small)
                tail.append(total - small)
            else:
                head.append(total - small)
                tail.append(small)
        return head, tail
    if auto_pad == "VALID" or not pads:
        return [0] * n, [0] * n
    return list(pads[:n]), list(pads[n : 2 * n])


_TLS = threading.local()


def _scratch(role: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A per-thread reusable work buffer (padded inputs, im2col columns).

    Fresh multi-MB arrays cost a page fault per 4 KiB on every call (expensive in VMs);
    reusing warm memory removes that. Only for temporaries that never escape a kernel;
    per thread, so concurrent Session.run calls do not share them.
    """
    bufs: dict[str, np.ndarray] = _TLS.__dict__.setdefault("bufs", {})
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = bufs.get(role)
    if buf is None or buf.nbytes < nbytes:
        buf = bufs[role] = np.empty(max(nbytes, 64), np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


def _pad_spatial(
    x: np.ndarray, head: Sequence[int], tail: Sequence[int], value: Any, role: str | None = None
) -> np.ndarray:
    """x [N, C, *sp] padded on the spatial axes with a constant (contiguous).

    With `role`, the result lives in a per-thread scratch buffer (valid until the next
    use of that role on this thread).
    """
    if not any(head) and not any(tail):
        return np.ascontiguousarray(x)
    shape = x.shape[:2] + tuple(x.shape[2 + i] + head[i] + tail[i] for i in range(len(head)))
    if role is None:
        out = np.full(shape, value, dtype=x.dtype)
    else:
        out = _scratch(role, shape, x.dtype)
        out.fill(value)
    sl = (slice(None), slice(None)) + tuple(
        slice(head[i], head[i] + x.shape[2 + i]) for i in range(len(head))
    )
    out[sl] = x
    return out


# --------------------------------------------------------------------------- Conv


@register("Conv", since=1)
def _conv(spec: NodeSpec) -> Kernel:
    """Conv via BLAS: 1x1 as a plain matmul, k x k via im2col, depthwise via a numba loop."""
    auto_pad = spec.attr("auto_pad", "NOTSET")
    group = int(spec.attr("group", 1))
    attr_k = _ints(spec.attr("kernel_shape"))
    attr_pads = _ints(spec.attr("pads"))
    attr_s = _ints(spec.attr("strides"))
    attr_d = _ints(spec.attr("dilations"))
    w_const = spec.const(1)
    b_const = spec.const(2) if spec.has_input(2) else None
    packed: dict[str, Any] = {}
    if w_const is not None:
        packed["w"] = _pack_conv_weight(w_const, group)
    if b_const is not None:
        packed["b"] = _up(b_const).reshape(-1)

    def run(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
        out_dtype = x.dtype
        xw = _up(x)
        pw = packed.get("w") if w is w_const else None
        if pw is None:
            pw = _pack_conv_weight(w, group)
        bias = packed.get("b") if (b is b_const and b is not None) else None
        if bias is None and b is not None:
            bias = _up(b).reshape(-1)
        y = _conv_run(xw, pw, bias, group, auto_pad, attr_k, attr_pads, attr_s, attr_d)
        return y if y.dtype == out_dtype else y.astype(out_dtype)

    return run


def _pack_conv_weight(w: np.ndarray, group: int) -> dict[str, Any]:
    """Weight [M, C/G, *k] as [G, M/G, C/G*K] GEMM operands plus depthwise form."""
    w = _up(np.asarray(w))
    m = w.shape[0]
    ksp = tuple(w.shape[2:])
    kprod = int(np.prod(ksp)) if ksp else 1
    gemm = np.ascontiguousarray(w.reshape(group, m // group, w.shape[1] * kprod))
    packed: dict[str, Any] = {"gemm": gemm, "ksp": ksp, "M": m, "Cg": w.shape[1], "raw": w}
    # per-tap form for the stride-1 shifted-GEMM path: [G, K, M/G, C/G]
    packed["taps"] = np.ascontiguousarray(
        w.reshape(group, m // group, w.shape[1], kprod).transpose(0, 3, 1, 2)
    )
    if w.shape[1] == 1 and len(ksp) == 2:
        packed["dw"] = np.ascontiguousarray(w.reshape(m, ksp[0], ksp[1]))
    return packed


def _conv_run(
    x: np.ndarray,
    pw: dict[str, Any],
    bias: np.ndarray | None,
    group: int,
    auto_pad: str,
    attr_k: list[int] | None,
    attr_pads: list[int] | None,
    attr_s: list[int] | None,
    attr_d: list[int] | None,
) -> np.ndarray:
    n, c = x.shape[:2]
    in_sp = x.shape[2:]
    nd = len(in_sp)
    ksp = pw["ksp"] if attr_k is None else tuple(attr_k)
    s = attr_s or [1] * nd
    d = attr_d or [1] * nd
    m = pw["M"]
    cg = c // group
    head, tail = _spatial_pads(auto_pad, attr_pads, in_sp, ksp, s, d)
    out_sp = tuple(
        (in_sp[i] + head[i] + tail[i] - (ksp[i] - 1) * d[i] - 1) // s[i] + 1 for i in range(nd)
    )
    dt = x.dtype
    kprod = int(np.prod(ksp)) if ksp else 1

    # 1x1: no im2col at all, just (strided) subsample and GEMM.
    if kprod == 1 and not any(head) and not any(tail):
        xs = (
            x[(slice(None), slice(None)) + tuple(slice(0, None, si) for si in s)]
            if any(si != 1 for si in s)
            else x
        )
        cols = (
            xs.reshape(n, group, cg, -1)
            if xs.flags.c_contiguous
            else np.ascontiguousarray(xs).reshape(n, group, cg, -1)
        )
        y = np.matmul(pw["gemm"], cols)
        y = y.reshape((n, m) + out_sp)
        if bias is not None:
            y += bias.reshape((m,) + (1,) * nd)
        return y

    # Depthwise 1-D: run as 2-D with a unit height.
    if nd == 1 and group == c and pw["Cg"] == 1 and dt in (np.float32, np.float64):
        pw2 = pw.get("as2d")
        if pw2 is None:
            pw2 = pw["as2d"] = _pack_conv_weight(pw["raw"][:, :, None, :], group)
        y = _conv_run(
            x[:, :, None, :],
            pw2,
            bias,
            group,
            "NOTSET",
            [1, ksp[0]],
            [0, head[0], 0, tail[0]],
            [1, s[0]],
            [1, d[0]],
        )
        return y[:, :, 0, :]

    # Depthwise 2-D: one fused loop (numba).
    if "dw" in pw and group == c and nd == 2 and dt in (np.float32, np.float64):
        xp = _pad_spatial(x, head, tail, 0, "pad")
        w = pw["dw"] if pw["dw"].dtype == dt else pw["dw"].astype(dt)
        bv = np.zeros(m, dtype=dt) if bias is None else bias.astype(dt, copy=False)
        y = np.empty((n, m) + out_sp, dtype=dt)
        float_nn.depthwise_conv2d(xp, w, bv, s[0], s[1], d[0], d[1], y)
        return y

    xp = _pad_spatial(x, head, tail, 0, "pad")
    item = xp.itemsize
    sn, sc = xp.strides[:2]
    sp_strides = xp.strides[2:]
    ksp_t = tuple(ksp)

    if all(si == 1 for si in s):
        # Stride 1: treat the padded image as flat rows; output positions sit at
        # flat offsets sum(o_i * pstride_i), so each kernel tap is a contiguous
        # shifted window of length L (a few wasted columns at the row ends).
        pstr = [st // item for st in sp_strides]
        span = sum((out_sp[i] - 1) * pstr[i] for i in range(nd)) + 1
        total = int(np.prod(out_sp))
        if span <= 1.5 * total + 16:
            view = as_strided(
                xp,
                shape=(n, c) + ksp_t + (span,),
                strides=(sn, sc) + tuple(d[i] * sp_strides[i] for i in range(nd)) + (item,),
                writeable=False,
            )
            cols = _scratch("cols", (n, group, cg * kprod, span), xp.dtype)
            np.copyto(cols.reshape(view.shape), view)
            yf = np.matmul(pw["gemm"], cols).reshape(n, m, span)
            if span == total:
                y = yf.reshape((n, m) + out_sp)
            else:  # drop the wasted columns
                y = as_strided(
                    yf,
                    shape=(n, m) + out_sp,
                    strides=yf.strides[:2] + tuple(p * yf.itemsize for p in pstr),
                    writeable=False,
                ).copy()
            if bias is not None:
                y += bias.reshape((m,) + (1,) * nd)
            return y

    view = as_strided(
        xp,
        shape=(n, c) + ksp_t + out_sp,
        strides=(sn, sc)
        + tuple(d[i] * sp_strides[i] for i in range(nd))
        + tuple(s[i] * sp_strides[i] for i in range(nd)),
        writeable=False,
    )
    cols = _scratch("cols", (n, group, cg * kprod, int(np.prod(out_sp))), xp.dtype)
    np.copyto(cols.reshape(view.shape), view)
    y = np.matmul(pw["gemm"], cols).reshape((n, m) + out_sp)
    if bias is not None:
        y += bias.reshape((m,) + (1,) * nd)
    return y


# --------------------------------------------------------------------------- Gemm / MatMul


@register("Gemm", since=1)
def _gemm(spec: NodeSpec) -> Kernel:
    """Y = alpha * A' @ B' + beta * C; beta*C folded at plan time when C is constant."""
    alpha = float(spec.attr("alpha", 1.0))
    beta = float(spec.attr("beta", 1.0))
    ta = bool(spec.attr("transA", 0))
    tb = bool(spec.attr("transB", 0))
    c_const = spec.const(2) if spec.has_input(2) else None
    c_scaled = None
    if c_const is not None and beta != 0:
        c_scaled = _up(c_const) * np.float32(beta) if beta != 1 else _up(c_const)

    def run(a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
        out_dtype = a.dtype
        a2 = _up(a)
        b2 = _up(b)
        if ta:
            a2 = a2.T
        if tb:
            b2 = b2.T
        y = a2 @ b2
        if alpha != 1.0:
            y *= y.dtype.type(alpha)
        if c is not None and beta != 0:
            if c is c_const and c_scaled is not None:
                y += c_scaled.astype(y.dtype, copy=False)
            else:
                c2 = _up(c)
                y += c2 if beta == 1.0 else c2 * y.dtype.type(beta)
        return y if y.dtype == out_dtype else y.astype(out_dtype)

    return run


@register("MatMul", since=1)
def _matmul(spec: NodeSpec) -> Kernel:
    """numpy matmul; N-D @ 2-D is folded into one big GEMM instead of per-batch calls.

    Float GEMMs keep OpenBLAS's own threads: routing them through our pool as
    single-threaded BLAS calls per column block measured slower end to end (float BERT
    36.4 vs 34.1 ms, ResNet-18 56.7 vs 50.1 ms), see kernels/float_nn.py.
    """

    def run(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out_dtype = np.result_type(a.dtype, b.dtype)
        a2 = _up(a)
        b2 = _up(b)
        if a2.ndim > 2 and b2.ndim == 2:
            a2c = np.ascontiguousarray(a2)
            y = (a2c.reshape(-1, a2c.shape[-1]) @ b2).reshape(a2.shape[:-1] + (b2.shape[1],))
        else:
            y = np.matmul(a2, b2)
        return y if y.dtype == out_dtype else y.astype(out_dtype)

    return run


# --------------------------------------------------------------------------- Softmax


def _softmax_lastdims(x: np.ndarray, axis: int | tuple[int, ...]) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.subtract(x, m)
    np.exp(e, out=e)
    e /= np.sum(e, axis=axis, keepdims=True)
    return e


@register("Softmax", since=1)
def _softmax(spec: NodeSpec) -> Kernel:
    """Opset < 13 flattens to 2-D at `axis` (default 1); 13+ is per-axis (default -1)."""
    legacy = spec.opset < 13
    axis = int(spec.attr("axis", 1 if legacy else -1))

    def run(x: np.ndarray) -> np.ndarray:
        xw = _up(x)
        ax = axis + x.ndim if axis < 0 else axis
        if legacy:
            rows = int(np.prod(x.shape[:ax])) if ax else 1
            y = _softmax_lastdims(xw.reshape(rows, -1), 1).reshape(x.shape)
        else:
            y = _softmax_lastdims(xw, ax)
        return y if y.dtype == x.dtype else y.astype(x.dtype)

    return run


# --------------------------------------------------------------------------- LayerNorm


@register("LayerNormalization", since=17)
def _layer_norm(spec: NodeSpec) -> Kernel:
    """Normalize over axes [axis, rank); statistics in float32 (stash_type=1) or input dtype."""
    axis = int(spec.attr("axis", -1))
    eps = float(spec.attr("epsilon", 1e-5))
    stash = int(spec.attr("stash_type", 1))
    n_out = len(spec.outputs)

    def run(
        x: np.ndarray, scale: np.ndarray, b: np.ndarray | None = None
    ) -> np.ndarray | list[np.ndarray]:
        ax = axis + x.ndim if axis < 0 else axis
        cdt = np.dtype(np.float32) if stash == 1 and x.dtype != np.float64 else _work_dtype(x.dtype)
        rows = int(np.prod(x.shape[:ax])) if ax else 1
        cols = int(np.prod(x.shape[ax:])) if ax < x.ndim else 1
        x2 = np.ascontiguousarray(x.reshape(rows, cols), dtype=cdt)
        norm_shape = x.shape[ax:]
        sc = np.broadcast_to(scale, norm_shape).reshape(cols).astype(cdt, copy=False)
        bb = (
            np.zeros(cols, cdt)
            if b is None
            else np.broadcast_to(b, norm_shape).reshape(cols).astype(cdt, copy=False)
        )
        y = np.empty_like(x2)
        mean = np.empty(rows, cdt)
        inv = np.empty(rows, cdt)
        if cdt in (np.float32, np.float64) and cols > 0:
            float_nn.layer_norm_rows(
                x2, np.ascontiguousarray(sc), np.ascontiguousarray(bb), eps, y, mean, inv
            )
        else:  # pragma: no cover - only exotic dtypes
            mu = x2.mean(axis=1, keepdims=True)
            dlt = x2 - mu
            iv = 1.0 / np.sqrt((dlt * dlt).mean(axis=1, keepdims=True) + eps)
            y[...] = dlt * iv * sc + bb
            mean[:] = mu[:, 0]
            inv[:] = iv[:, 0]
        y = y.reshape(x.shape).astype(x.dtype, copy=False)
        if n_out == 1:
            return y
        red_shape = x.shape[:ax] + (1,) * (x.ndim - ax)
        outs = [y, mean.reshape(red_shape), inv.reshape(red_shape)]
        return outs[:n_out]

    return run


# --------------------------------------------------------------------------- BatchNorm


@register("BatchNormalization", since=1)
def _batch_norm(spec: NodeSpec) -> Kernel:
    """Inference BN as y = x * a + b with a, b folded at plan time; training mode computed too."""
    eps = float(spec.attr("epsilon", 1e-5))
    momentum = float(spec.attr("momentum", 0.9))
    opset = spec.opset
    if opset >= 14:
        training = bool(spec.attr("training_mode", 0))
    elif opset < 7:
        training = not bool(spec.attr("is_test", 0))
    else:
        # opset 7..13: training only implied by extra outputs being requested.
        training = len([o for o in spec.outputs if o]) > 1
    spatial = int(spec.attr("spatial", 1)) if opset < 9 else 1
    n_out = len(spec.outputs)
    consts = [spec.const(i) for i in range(1, 5)]
    folded: tuple[np.ndarray, np.ndarray] | None = None
    if not training and all(cv is not None for cv in consts):
        folded = _bn_fold(*consts, eps)  # type: ignore[arg-type]

    def run(
        x: np.ndarray, scale: np.ndarray, b: np.ndarray, mean: np.ndarray, var: np.ndarray
    ) -> np.ndarray | list[np.ndarray]:
        xw = _up(x)
        shape_tail = x.shape[2:]
        if training:
            axes = (0,) + tuple(range(2, x.ndim))
            cur_mean = xw.mean(axis=axes)
            cur_var = xw.var(axis=axes)
            a, bb = _bn_fold(scale, b, cur_mean, cur_var, eps)
            y = xw * _bcast(a, x.ndim, shape_tail, spatial)
            y += _bcast(bb, x.ndim, shape_tail, spatial)
            run_mean = (mean * momentum + cur_mean * (1 - momentum)).astype(x.dtype)
            run_var = (var * momentum + cur_var * (1 - momentum)).astype(x.dtype)
            if opset >= 14:
                outs = [y.astype(x.dtype, copy=False), run_mean, run_var]
            else:
                outs = [
                    y.astype(x.dtype, copy=False),
                    run_mean,
                    run_var,
                    cur_mean.astype(x.dtype),
                    cur_var.astype(x.dtype),
                ]
            return outs[:n_out] if n_out > 1 else outs[0]
        if folded is not None:
            a, bb = folded
        else:
            a, bb = _bn_fold(scale, b, mean, var, eps)
        a = _bcast(a, x.ndim, shape_tail, spatial).astype(xw.dtype, copy=False)
        bb = _bcast(bb, x.ndim, shape_tail, spatial).astype(xw.dtype, copy=False)
        y = xw * a
        y += bb
        return y if y.dtype == x.dtype else y.astype(x.dtype)

    return run


def _bn_fold(
    scale: np.ndarray, b: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    scale, b, mean, var = (np.asarray(v, dtype=np.float64) for v in (scale, b, mean, var))
    a = scale / np.sqrt(var + eps)
    return a.astype(np.float32), (b - mean * a).astype(np.float32)


def _bcast(v: np.ndarray, ndim: int, tail: tuple[int, ...], spatial: int) -> np.ndarray:
    if spatial == 0 and v.size != (v.shape[0] if v.ndim else 1):
        return v.reshape((1,) + v.shape)
    if spatial == 0 and v.ndim > 1:
        return v.reshape((1,) + v.shape)
    return v.reshape((-1,) + (1,) * (ndim - 2))


# --------------------------------------------------------------------------- pooling


def _pool_geometry(
    spec_attrs: dict[str, Any], in_sp: Sequence[int], opset: int
) -> tuple[list[int], list[int], list[int], list[int], list[int], tuple[int, ...], list[int]]:
    """kernel, strides, dilations, head pads, tail pads (explicit), out shape, ceil extension."""
    k = list(spec_attrs["kernel_shape"])
    nd = len(k)
    s = _ints(spec_attrs.get("strides")) or [1] * nd
    d = _ints(spec_attrs.get("dilations")) or [1] * nd
    auto_pad = spec_attrs.get("auto_pad", "NOTSET")
    ceil_mode = int(spec_attrs.get("ceil_mode", 0))
    head, tail = _spatial_pads(auto_pad, _ints(spec_attrs.get("pads")), in_sp, k, s, d)
    out: list[int] = []
    extra: list[int] = []
    for i in range(nd):
        win = (k[i] - 1) * d[i] + 1
        span = in_sp[i] + head[i] + tail[i] - win
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            o = -(-in_sp[i] // s[i])
        elif ceil_mode:
            o = -(-span // s[i]) + 1
            # the last window must start inside the input or the head padding
            if (o - 1) * s[i] >= in_sp[i] + head[i]:
                o -= 1
        else:
            o = span // s[i] + 1
        o = max(o, 0)
        out.append(o)
        need = (o - 1) * s[i] + win
        extra.append(max(0, need - (in_sp[i] + head[i] + tail[i])))
    return k, s, d, head, tail, tuple(out), extra


def _window_views(
    xp: np.ndarray, k: Sequence[int], s: Sequence[int], d: Sequence[int], out: Sequence[int]
):
    """Yield (tap index tuple, strided view [N, C, *out]) for every kernel tap."""
    nd = len(k)
    base_strides = xp.strides[:2] + tuple(s[i] * xp.strides[2 + i] for i in range(nd))
    shape = xp.shape[:2] + tuple(out)
    for tap in np.ndindex(*k):
        offset = sum(tap[i] * d[i] * xp.strides[2 + i] for i in range(nd))
        yield tap, np.ndarray(shape, dtype=xp.dtype, buffer=xp, offset=offset, strides=base_strides)


#: dtypes the numba 2-D max pool is compiled for (others take the numpy path)
_POOL_NUMBA_DTYPES = (np.float32, np.float64, np.int8, np.uint8)


def _lowest(dt: np.dtype) -> Any:
    return -np.inf if dt.kind == "f" else np.iinfo(dt).min


@register("MaxPool", since=1)
def _max_pool(spec: NodeSpec) -> Kernel:
    """Running np.maximum over the k taps (strided views); Indices via a tap-argmax."""
    attrs = dict(spec.attrs)
    storage_order = int(attrs.get("storage_order", 0))
    want_idx = len(spec.outputs) > 1 and spec.outputs[1] != ""
    opset = spec.opset

    def run(x: np.ndarray) -> np.ndarray | list[np.ndarray]:
        in_sp = x.shape[2:]
        k, s, d, head, tail, out, extra = _pool_geometry(attrs, in_sp, opset)
        nd = len(k)
        tail2 = [tail[i] + extra[i] for i in range(nd)]
        xp = _pad_spatial(x, head, tail2, _lowest(x.dtype), "pad")
        if nd == 2 and not want_idx and x.dtype in _POOL_NUMBA_DTYPES:
            out_arr = np.empty(x.shape[:2] + out, x.dtype)
            float_nn.max_pool2d(xp, k[0], k[1], s[0], s[1], d[0], d[1], out_arr)
            return out_arr
        y: np.ndarray | None = None
        best_tap: np.ndarray | None = None
        for t, (_, v) in enumerate(_window_views(xp, k, s, d, out)):
            if y is None:
                y = v.copy()
                if want_idx:
                    best_tap = np.zeros(y.shape, np.int64)
            elif want_idx:
                better = v > y
                np.copyto(y, v, where=better)
                best_tap[better] = t  # type: ignore[index]
            else:
                np.maximum(y, v, out=y)
        assert y is not None
        if not want_idx:
            return y
        taps = np.array(list(np.ndindex(*k)), dtype=np.int64).reshape(-1, nd)
        n, c = x.shape[:2]
        idx = np.zeros(y.shape, np.int64)
        coords = []
        for i in range(nd):
            o_i = np.arange(out[i], dtype=np.int64).reshape((-1,) + (1,) * (nd - 1 - i))
            coord = o_i * s[i] + taps[best_tap, i] * d[i] - head[i]  # type: ignore[index]
            coords.append(np.clip(coord, 0, in_sp[i] - 1))
        if storage_order == 1:
            mult = 1
            for i in range(nd):
                idx += coords[i] * mult
                mult *= in_sp[i]
        else:
            mult = 1
            for i in reversed(range(nd)):
                idx += coords[i] * mult
                mult *= in_sp[i]
        plane = int(np.prod(in_sp))
        idx += (np.arange(n * c, dtype=np.int64) * plane).reshape((n, c) + (1,) * nd)
        return [y, idx]

    return run


@register("AveragePool", since=1)
def _average_pool(spec: NodeSpec) -> Kernel:
    """Running sum over the k taps divided by a per-position count (pads per count_include_pad)."""
    attrs = dict(spec.attrs)
    include_pad = int(attrs.get("count_include_pad", 0))
    opset = spec.opset
    cache: dict[tuple[int, ...], Any] = {}

    def run(x: np.ndarray) -> np.ndarray:
        in_sp = tuple(x.shape[2:])
        xw = _up(x)
        geo = cache.get(in_sp)
        if geo is None:
            k, s, d, head, tail, out, extra = _pool_geometry(attrs, in_sp, opset)
            nd = len(k)
            tail2 = [tail[i] + extra[i] for i in range(nd)]
            # count of real (or real + explicit pad) cells under each window
            mask = np.zeros(
                (1, 1) + tuple(in_sp[i] + head[i] + tail2[i] for i in range(nd)), np.float64
            )
            if include_pad:
                sl = tuple(slice(0, in_sp[i] + head[i] + tail[i]) for i in range(nd))
            else:
                sl = tuple(slice(head[i], head[i] + in_sp[i]) for i in range(nd))
            mask[(0, 0) + sl] = 1.0
            cnt = np.zeros((1, 1) + out, np.float64)
            for _, v in _window_views(mask, k, s, d, out):
                cnt += v
            inv = (1.0 / np.maximum(cnt, 1.0)).astype(xw.dtype)
            geo = cache[in_sp] = (k, s, d, head, tail2, out, inv)
        k, s, d, head, tail2, out, inv = geo
        xp = _pad_spatial(xw, head, tail2, 0, "pad")
        if len(k) == 2 and xp.dtype in (np.float32, np.float64):
            res = np.empty(x.shape[:2] + out, xp.dtype)
            float_nn.sum_pool2d(
                xp,
                k[0],
                k[1],
                s[0],
                s[1],
                d[0],
                d[1],
                np.ascontiguousarray(inv[0, 0], dtype=xp.dtype),
                res,
            )
            return res if res.dtype == x.dtype else res.astype(x.dtype)
        acc: np.ndarray | None = None
        for _, v in _window_views(xp, k, s, d, out):
            if acc is None:
                acc = v.copy()
            else:
                acc += v
        assert acc is not None
        acc *= inv.astype(acc.dtype, copy=False)
        return acc if acc.dtype == x.dtype else acc.astype(x.dtype)

    return run


@register("GlobalAveragePool", since=1)
def _global_average_pool(spec: NodeSpec) -> Kernel:
    """Mean over all spatial axes, keeping them as size-1 dims."""

    def run(x: np.ndarray) -> np.ndarray:
        n, c = x.shape[:2]
        xw = _up(x)
        y = xw.reshape(n, c, -1).mean(axis=2, dtype=xw.dtype)
        return y.reshape((n, c) + (1,) * (x.ndim - 2)).astype(x.dtype, copy=False)

    return run


# --------------------------------------------------------------------------- ReduceMean


@register("ReduceMean", since=1)
def _reduce_mean(spec: NodeSpec) -> Kernel:
    """Mean over axes (attribute before opset 18, input from 18; noop_with_empty_axes)."""
    keepdims = bool(spec.attr("keepdims", 1))
    noop = bool(spec.attr("noop_with_empty_axes", 0))
    from_input = spec.opset >= 18
    attr_axes = _ints(spec.attr("axes"))

    def run(x: np.ndarray, axes_in: np.ndarray | None = None) -> np.ndarray:
        axes = _ints(axes_in.reshape(-1)) if (from_input and axes_in is not None) else attr_axes
        if from_input and (axes is None or len(axes) == 0):
            if noop:
                return x
            axes = None
        elif not axes:
            axes = None
        ax = None if axes is None else tuple(a + x.ndim if a < 0 else a for a in axes)
        xw = _up(x)
        if x.dtype.kind in "iu":
            y = np.mean(x, axis=ax, keepdims=keepdims, dtype=np.float64)
            return np.trunc(y).astype(x.dtype) if x.dtype.kind == "i" else y.astype(x.dtype)
        y = np.mean(xw, axis=ax, keepdims=keepdims, dtype=xw.dtype)
        return np.asarray(y).astype(x.dtype, copy=False)

    return run


# --------------------------------------------------------------------------- Pad


@register("Pad", since=1)
def _pad(spec: NodeSpec) -> Kernel:
    """Constant pads by slice-assignment into a filled array; other modes via np.pad."""
    mode = spec.attr("mode", "constant")
    opset = spec.opset
    attr_pads = _ints(spec.attr("pads") if opset >= 2 else spec.attr("paddings"))
    attr_value = float(spec.attr("value", 0.0))

    def run(
        x: np.ndarray,
        pads_in: np.ndarray | None = None,
        value_in: np.ndarray | None = None,
        axes_in: np.ndarray | None = None,
    ) -> np.ndarray:
        if opset >= 11:
            pads = _ints(pads_in.reshape(-1))  # type: ignore[union-attr]
            value: Any = 0 if value_in is None or value_in.size == 0 else value_in.reshape(-1)[0]
        else:
            pads = attr_pads
            value = attr_value
        assert pads is not None
        r = x.ndim
        axes = (
            list(range(r))
            if axes_in is None
            else [a + r if a < 0 else a for a in _ints(axes_in.reshape(-1)) or []]
        )
        na = len(axes)
        width = [[0, 0] for _ in range(r)]
        for i, a in enumerate(axes):
            width[a] = [pads[i], pads[na + i]]
        # negative pads crop first
        crop = tuple(
            slice(max(0, -lo), x.shape[i] - max(0, -hi)) for i, (lo, hi) in enumerate(width)
        )
        xc = x[crop]
        pos = [(max(0, lo), max(0, hi)) for lo, hi in width]
        if not any(lo or hi for lo, hi in pos):
            return np.array(xc, copy=True)
        if mode == "constant":
            shape = tuple(xc.shape[i] + pos[i][0] + pos[i][1] for i in range(r))
            out = np.full(shape, np.asarray(value).astype(x.dtype), dtype=x.dtype)
            out[tuple(slice(pos[i][0], pos[i][0] + xc.shape[i]) for i in range(r))] = xc
            return out
        return np.pad(xc, pos, mode=mode)  # type: ignore[call-overload]

    return run


# --------------------------------------------------------------------------- Resize

_NEAREST_LEGACY = "legacy"
#: Coordinate transformations whose nearest-mode coordinates are computed in float32.
_NEAREST_F32_CTMS = (
    "half_pixel",
    "pytorch_half_pixel",
    "asymmetric",
    "tf_half_pixel_for_nn",
    "align_corners",
)
#: |x - (k + 0.5)| up to this is a rounding tie (onnxruntime's nearest uses 1e-6 too).
_NEAREST_TIE_TOL = 1e-6


@register("Resize", since=10)
def _resize(spec: NodeSpec) -> Kernel:
    """Separable resize: per resized axis a gather (nearest) or a small weighted gather-sum.

    Per-axis index/weight tables depend only on shapes and scales, so they are cached.
    """
    opset = spec.opset
    is_upsample = spec.op_type == "Upsample"
    mode = spec.attr("mode", "nearest")
    if mode == "bilinear":
        mode = "linear"
    if mode == "trilinear":
        mode = "linear"
    legacy = is_upsample or opset < 11
    ctm = "asymmetric" if legacy else spec.attr("coordinate_transformation_mode", "half_pixel")
    nearest_mode = _NEAREST_LEGACY if legacy else spec.attr("nearest_mode", "round_prefer_floor")
    cubic_a = float(spec.attr("cubic_coeff_a", -0.75))
    exclude_outside = bool(spec.attr("exclude_outside", 0))
    extrap = float(spec.attr("extrapolation_value", 0.0))
    antialias = bool(spec.attr("antialias", 0))
    axes_attr = _ints(spec.attr("axes"))
    policy = spec.attr("keep_aspect_ratio_policy", "stretch")
    attr_scales = spec.attr("scales")  # Upsample-7
    cache: dict[Any, Any] = {}

    def run(x: np.ndarray, *rest: np.ndarray | None) -> np.ndarray:
        roi = scales = sizes = None
        if is_upsample:
            scales = rest[0] if rest else (None if attr_scales is None else np.array(attr_scales))
        elif opset < 11:
            scales = rest[0]
        else:
            roi = rest[0] if len(rest) > 0 else None
            scales = rest[1] if len(rest) > 1 else None
            sizes = rest[2] if len(rest) > 2 else None
        if scales is not None and scales.size == 0:
            scales = None
        if sizes is not None and sizes.size == 0:
            sizes = None
        if roi is not None and roi.size == 0:
            roi = None
        key = (
            x.shape,
            None if scales is None else tuple(np.asarray(scales, np.float64).tolist()),
            None if sizes is None else tuple(int(v) for v in sizes),
            None if roi is None else tuple(np.asarray(roi, np.float64).tolist()),
        )
        plan = cache.get(key)
        if plan is None:
            plan = _resize_plan(
                x.shape,
                scales,
                sizes,
                roi,
                axes_attr,
                policy,
                mode,
                ctm,
                nearest_mode,
                cubic_a,
                exclude_outside,
                antialias,
            )
            if len(cache) < 32:
                cache[key] = plan
        return _resize_apply(x, plan, extrap)

    return run


def _resize_plan(
    shape: tuple[int, ...],
    scales: np.ndarray | None,
    sizes: np.ndarray | None,
    roi: np.ndarray | None,
    axes: list[int] | None,
    policy: str,
    mode: str,
    ctm: str,
    nearest_mode: str,
    cubic_a: float,
    exclude_outside: bool,
    antialias: bool,
) -> list[tuple[int, np.ndarray, np.ndarray | None, np.ndarray | None]]:
    """Per axis to resize: (axis, indices [out, n], weights [out, n] or None, extrapolated mask)."""
    r = len(shape)
    ax = list(range(r)) if axes is None else [a + r if a < 0 else a for a in axes]
    scale_f = [1.0] * r
    out_size = list(shape)
    roi_full: list[float] | None = None
    if roi is not None:
        rv = np.asarray(roi, np.float64).reshape(-1)
        roi_full = [0.0] * r + [1.0] * r
        na = len(ax)
        for i, a in enumerate(ax):
            roi_full[a] = float(rv[i])
            roi_full[r + a] = float(rv[na + i])
    if sizes is not None:
        sv = [int(v) for v in np.asarray(sizes).reshape(-1)]
        for i, a in enumerate(ax):
            out_size[a] = sv[i]
            scale_f[a] = sv[i] / shape[a]
        if policy != "stretch":
            sel = [scale_f[a] for a in ax]
            sc = min(sel) if policy == "not_larger" else max(sel)
            for a in ax:
                scale_f[a] = sc
                out_size[a] = int(sc * shape[a] + 0.5)
    else:
        assert scales is not None, "Resize needs scales or sizes"
        sv2 = [float(v) for v in np.asarray(scales).reshape(-1)]
        for i, a in enumerate(ax):
            scale_f[a] = sv2[i]
            out_size[a] = int(sv2[i] * shape[a])  # truncation, as the reference does
    plan = []
    for a in range(r):
        sc = scale_f[a]
        o = out_size[a]
        n_in = shape[a]
        a_roi = None if roi_full is None else (roi_full[a], roi_full[a + r])
        if (
            math.isclose(sc, 1.0)
            and o == n_in
            and (a_roi is None or (math.isclose(a_roi[0], 0.0) and math.isclose(a_roi[1], 1.0)))
        ):
            continue
        plan.append(
            (a,)
            + _axis_table(
                n_in, o, sc, a_roi, mode, ctm, nearest_mode, cubic_a, exclude_outside, antialias
            )
        )
    return plan


def _axis_table(
    n_in: int,
    n_out: int,
    scale: float,
    roi: tuple[float, float] | None,
    mode: str,
    ctm: str,
    nearest_mode: str,
    cubic_a: float,
    exclude_outside: bool,
    antialias: bool,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    y = np.arange(n_out, dtype=np.float64)
    # As the ONNX reference: the "output length" in the formulas is scale * n_in (float).
    # But a float32 scale cannot hold most ratios (0.6f * 5 = 3.0000001): when the product
    # is the integer length up to that rounding, it means that length (spec and ORT).
    out_w = scale * n_in
    if abs(out_w - n_out) <= 4 * n_out * float(np.finfo(np.float32).eps):
        out_w = float(n_out)
    extr = None
    if ctm == "align_corners":
        x = np.zeros(n_out) if out_w == 1 else y * (n_in - 1) / (out_w - 1)
    elif ctm == "asymmetric":
        x = y / scale
    elif ctm == "tf_crop_and_resize":
        assert roi is not None
        if out_w == 1:
            x = np.full(n_out, (roi[1] - roi[0]) * (n_in - 1) / 2)
        else:
            x = y * (roi[1] - roi[0]) * (n_in - 1) / (out_w - 1)
        x = x + roi[0] * (n_in - 1)
        extr = (x < 0) | (x > n_in - 1)
    elif ctm == "pytorch_half_pixel":
        # spec and onnxruntime test the integer length here (the reference: float, -0.5)
        x = np.zeros(n_out) if n_out == 1 else (y + 0.5) / scale - 0.5
    elif ctm == "tf_half_pixel_for_nn":
        x = (y + 0.5) / scale
    elif ctm == "half_pixel":
        x = (y + 0.5) / scale - 0.5
    elif ctm == "half_pixel_symmetric":
        adj = n_out / out_w
        x = n_in / 2 * (1 - adj) + (y + 0.5) / scale - 0.5
    else:
        raise ValueError(f"unsupported coordinate_transformation_mode {ctm!r}")

    if mode == "nearest":
        if ctm in _NEAREST_F32_CTMS:
            # onnxruntime computes these coordinates in float32; at an exact boundary
            # (1.5 / 0.6f = 2.4999999 in float64, 2.5 in float32) floor/ceil pick another
            # pixel, so redo the formula in float32 for nearest (linear barely moves).
            y32, s32 = y.astype(np.float32), np.float32(scale)
            half = np.float32(0.5)
            if ctm == "half_pixel" or (ctm == "pytorch_half_pixel" and n_out > 1):
                x = (y32 + half) / s32 - half
            elif ctm == "asymmetric":
                x = y32 / s32
            elif ctm == "tf_half_pixel_for_nn":
                x = (y32 + half) / s32
            elif ctm == "align_corners" and out_w != 1:
                x = y32 * np.float32(n_in - 1) / np.float32(out_w - 1)
            x = x.astype(np.float64)
        # Ties are decided with a tolerance, as onnxruntime does: float32 rounding moves an
        # exact k + 0.5 a few ulps (7 -> 2 asymmetric: 1 / (2/7)f = 3.4999998, not 3.5).
        fl = np.floor(x)
        tie = np.abs(x - fl - 0.5) <= _NEAREST_TIE_TOL
        if nearest_mode == _NEAREST_LEGACY:
            # Upsample / Resize-10: asymmetric + floor (ORT truncates when upsampling)
            idx = fl
        elif nearest_mode == "round_prefer_floor":
            idx = np.where(tie, fl, np.floor(x + 0.5))
        elif nearest_mode == "round_prefer_ceil":
            idx = np.where(tie, fl + 1, np.floor(x + 0.5))
        elif nearest_mode == "floor":
            idx = np.floor(x)
        elif nearest_mode == "ceil":
            idx = np.ceil(x)
        else:
            raise ValueError(f"unsupported nearest_mode {nearest_mode!r}")
        idx = np.clip(idx, 0, n_in - 1).astype(np.intp)
        return idx.reshape(-1, 1), None, extr

    xi = np.floor(x)
    ratio = np.where(x == xi, 1.0, x - xi)  # prefer the left pixel (ratio in (0, 1])
    if mode == "linear":
        if antialias and scale < 1:
            start = int(np.floor(-1 / scale) + 1)
            taps = np.arange(start, 2 - start, dtype=np.float64)  # relative to floor pos
            args = (taps[None, :] - ratio[:, None]) * scale
            coeffs = np.clip(1 - np.abs(args), 0, 1)
            coeffs = coeffs / coeffs.sum(axis=1, keepdims=True)
        else:
            coeffs = np.stack([1 - ratio, ratio], axis=1)
    elif mode == "cubic":
        if antialias and scale < 1:
            i_start = int(np.floor(-2 / scale) + 1)
            taps = np.arange(i_start, 2 - i_start, dtype=np.float64)
            t = np.abs(scale * (taps[None, :] - ratio[:, None]))
            aa = cubic_a
            coeffs = np.where(
                t <= 1,
                (aa + 2) * t**3 - (aa + 3) * t**2 + 1,
                np.where(t < 2, aa * t**3 - 5 * aa * t**2 + 8 * aa * t - 4 * aa, 0.0),
            )
            coeffs = coeffs / coeffs.sum(axis=1, keepdims=True)
        else:
            aa = cubic_a
            r1 = ratio + 1
            q = 1 - ratio
            q1 = q + 1
            coeffs = np.stack(
                [
                    ((aa * r1 - 5 * aa) * r1 + 8 * aa) * r1 - 4 * aa,
                    ((aa + 2) * ratio - (aa + 3)) * ratio * ratio + 1,
                    ((aa + 2) * q - (aa + 3)) * q * q + 1,
                    ((aa * q1 - 5 * aa) * q1 + 8 * aa) * q1 - 4 * aa,
                ],
                axis=1,
            )
    else:
        raise ValueError(f"unsupported Resize mode {mode!r}")
    n = coeffs.shape[1]
    # neighbour window exactly as the ONNX reference picks it (ties to the left)
    pad = int(np.ceil(n / 2))
    xp = x + pad
    p = np.floor(xp)
    frac = xp - p
    if n % 2 == 0:
        off = np.where(frac == 0, -(n // 2), -(n // 2) + 1)
    else:
        base = -((n - 1) // 2)
        off = np.where(frac <= 0.5, base, base + 1)
    start = p.astype(np.int64) + off
    nbr = start[:, None] + np.arange(n)[None, :] - pad
    if exclude_outside:
        outside = (nbr < 0) | (nbr >= n_in)
        coeffs = np.where(outside, 0.0, coeffs)
        ssum = coeffs.sum(axis=1, keepdims=True)
        coeffs = coeffs / np.where(ssum == 0, 1.0, ssum)
    idx = np.clip(nbr, 0, n_in - 1).astype(np.intp)
    return idx, coeffs, extr


def _resize_apply(
    x: np.ndarray,
    plan: list[tuple[int, np.ndarray, np.ndarray | None, np.ndarray | None]],
    extrap: float,
) -> np.ndarray:
    """Apply per-axis tables; float math in float32 (float64 stays float64), ints rounded back."""
    dt = x.dtype
    if any(wts is not None for _, _, wts, _ in plan):
        cdt = np.float64 if dt == np.float64 else np.float32
        res = x.astype(cdt, copy=False)
    else:
        cdt = dt
        res = x
    masks = []
    for a, idx, wts, extr in plan:
        if wts is None:
            res = np.take(res, idx[:, 0], axis=a)
        else:
            # fold identical neighbours? keep simple: sum_j w[:, j] * take(idx[:, j])
            wshape = (1,) * a + (-1,) + (1,) * (res.ndim - a - 1)
            acc = None
            for j in range(idx.shape[1]):
                g = np.take(res, idx[:, j], axis=a)
                g *= wts[:, j].astype(cdt).reshape(wshape)
                acc = g if acc is None else np.add(acc, g, out=acc)
            assert acc is not None
            res = acc
        if extr is not None and extr.any():
            masks.append((a, extr))
    if masks:
        res = np.array(res, copy=True)
        for a, extr in masks:
            sl = [slice(None)] * res.ndim
            sl[a] = np.nonzero(extr)[0]
            res[tuple(sl)] = extrap
    if res.dtype == dt:
        return res
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return np.clip(np.rint(res), info.min, info.max).astype(dt)
    return res.astype(dt)
