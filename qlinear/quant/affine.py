"""The affine arithmetic: quantize, dequantize, choose parameters. Pure functions over arrays.

Every quantize/dequantize in qlinear (runtime ops, quantizer, passes that fold
constants) goes through these, so there is one definition of rounding and saturation:

    q = saturate(rint(x / scale) + zero_point)      round half to even
    x = (q - zero_point) * scale                    float32

Both are bit-identical to ``onnx.reference`` QuantizeLinear/DequantizeLinear for
finite quotients below 2**31 in magnitude. Beyond that, and for ±Inf and NaN,
onnx.reference casts out-of-range floats to int32 (undefined, in practice INT_MIN);
we saturate instead (+big -> qmax, -big -> qmin, NaN -> qmin), as onnxruntime does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qlinear.errors import QuantParamsError
from qlinear.quant.dtypes import quant_dtype
from qlinear.quant.granularity import Granularity, PerTensor, scale_shape_for
from qlinear.quant.params import QuantParams

_F32_TINY = np.finfo(np.float32).tiny


def _division_dtype(x_dtype: np.dtype) -> np.dtype:
    """float32 for float32/float16/bfloat16/int8/int16 inputs; float64 for float64/int32.

    This is numpy's promotion of ``x / float32_scale``, the order onnx.reference uses.
    """
    try:
        work = np.result_type(x_dtype, np.float32)
    except TypeError:
        return np.dtype(np.float32)
    return work if work in (np.float32, np.float64) else np.dtype(np.float32)


def quantize_affine(x: Any, qp: QuantParams, *, saturate: bool = True) -> np.ndarray:
    """``saturate(rint(x / scale) + zero_point)`` as an array of ``qp.dtype``.

    The division is done in float32 for float32 inputs (float64 for float64/int32, as
    numpy promotes in onnx.reference). `saturate` matters only for float8 outputs
    (ONNX's ``saturate`` attribute); integer outputs always saturate.
    """
    x = np.asarray(x)
    scale, zp = qp.expand(x.shape)
    work = _division_dtype(x.dtype)
    q = np.asarray(np.divide(x.astype(work, copy=False), scale.astype(work, copy=False)))
    qd = qp.qdtype
    if qd.is_float:
        if saturate:
            q = np.clip(q, qd.qmin, qd.qmax)
        if qd.bits == 4:  # ONNX adds the (zero) zero point for float4: -0 becomes +0
            q = q + zp.astype(q.dtype)
        return q.astype(qd.np_dtype)
    np.rint(q, out=q)
    if qd.bits > 16:  # int32: keep the bounds exact
        q = q.astype(np.float64)
    if zp.size != 1 or zp.reshape(()) != 0:
        q += zp.astype(q.dtype)
    # fmax/fmin (not clip): NaN -> qmin, like onnxruntime.
    np.fmax(q, qd.qmin, out=q)
    np.fmin(q, qd.qmax, out=q)
    return q.astype(qd.np_dtype)


def dequantize_affine(q: Any, qp: QuantParams) -> np.ndarray:
    """``(q - zero_point) * scale`` in float32, one rounding (in the product).

    The subtraction is exact for every <= 16-bit type. For int32 with a non-zero zero
    point (ONNX expects 0 there) onnx.reference subtracts in float64 and may differ.
    """
    q = np.asarray(q)
    quant_dtype(q.dtype)  # raises on a non-quantized dtype
    if q.dtype != qp.dtype:
        raise QuantParamsError(
            f"tensor dtype {q.dtype} does not match QuantParams dtype {qp.dtype}"
        )
    scale, zp = qp.expand(q.shape)
    y = q.astype(np.float32)  # a fresh array: safe to work in place
    if zp.size != 1 or zp.reshape(()) != 0:
        y -= zp.astype(np.float32)
    y *= scale  # scale broadcasts to q.shape (expand guarantees it)
    return y


def choose_qparams(
    min_val: Any,
    max_val: Any,
    dtype: Any,
    *,
    symmetric: bool = False,
) -> QuantParams:
    """Scale and zero point that cover [min_val, max_val] (extended to include 0).

    `min_val`/`max_val` may have any (broadcastable) shape; that shape becomes the scale
    shape. Asymmetric: ``scale = (max - min) / (qmax - qmin)``,
    ``zp = rint(clip(qmin - min / scale))`` in float32, exactly as ONNX
    DynamicQuantizeLinear. Symmetric: the zero point is the midpoint (0 signed; 128,
    32768, 8 unsigned) and ``scale = max(|min|, |max|) / (qmax - zp)`` so neither end
    clips (int8: amax/127). A (near-)zero range, where the scale would be below the
    smallest normal float32 (all-zero tensors), gets ``scale = 1.0`` with zero point 0
    (asymmetric, as onnxruntime) or the midpoint (symmetric). NaN/Inf or min > max raise
    QuantParamsError.
    """
    qd = quant_dtype(dtype)
    if qd.is_float:
        raise QuantParamsError(f"choose_qparams supports integer dtypes, not {qd.name}")
    mn = np.asarray(min_val, dtype=np.float32)
    mx = np.asarray(max_val, dtype=np.float32)
    shape = np.broadcast_shapes(mn.shape, mx.shape)
    mn = np.broadcast_to(mn, shape)
    mx = np.broadcast_to(mx, shape)
    if not (np.all(np.isfinite(mn)) and np.all(np.isfinite(mx))):
        raise QuantParamsError("choose_qparams: min/max contain NaN or Inf")
    if np.any(mn > mx):
        raise QuantParamsError("choose_qparams: min_val > max_val")
    zero = np.float32(0)
    mn = np.minimum(mn, zero)
    mx = np.maximum(mx, zero)
    qmin, qmax = np.float32(qd.qmin), np.float32(qd.qmax)
    if symmetric:
        mid = 0 if qd.signed else (int(qd.qmax) + 1) // 2
        half = np.float32(min(int(qd.qmax) - mid, mid - int(qd.qmin)))
        scale = np.maximum(-mn, mx) / half
        zp = np.full(shape, mid, dtype=np.float32)
        degenerate = ~(scale >= _F32_TINY)
    else:
        scale = (mx - mn) / (qmax - qmin)
        degenerate = ~(scale >= _F32_TINY)
        safe = np.where(degenerate, np.float32(1), scale)
        zp = np.rint(np.clip(qmin - mn / safe, qmin, qmax))
        zp = np.where(degenerate, np.float32(0), zp)
    scale = np.where(degenerate, np.float32(1), scale).astype(np.float32)
    return QuantParams(scale, zp.astype(np.int32), qd.np_dtype)


def choose_qparams_for_tensor(
    x: Any,
    dtype: Any,
    granularity: Granularity = PerTensor(),  # noqa: B008  (frozen, immutable)
    *,
    symmetric: bool = False,
) -> QuantParams:
    """Min/max of `x` over each block of `granularity`, then :func:`choose_qparams`.

    The scale has the rank of `x` (``(1,) * x.ndim`` for per-tensor). This is what a
    weight quantizer calls: ``choose_qparams_for_tensor(w, np.int8, PerAxis(0),
    symmetric=True)``. An empty tensor gives the zero-range parameters.
    """
    x = np.asarray(x)
    scale_shape = scale_shape_for(granularity, x.shape)
    if x.size == 0:
        mn = mx = np.zeros(scale_shape, dtype=np.float32)
    else:
        # (s0, b0, s1, b1, ...) then reduce the block axes: one pass, no Python loops.
        split: list[int] = []
        for d, s in zip(x.shape, scale_shape, strict=True):
            split += [s, d // s]
        blocks = x.reshape(split)
        block_axes = tuple(range(1, 2 * x.ndim, 2))
        mn = blocks.min(axis=block_axes)
        mx = blocks.max(axis=block_axes)
        if np.isnan(mn).any() or np.isnan(mx).any():
            raise QuantParamsError("choose_qparams_for_tensor: tensor contains NaN")
    return choose_qparams(mn, mx, dtype, symmetric=symmetric)


def bias_qparams(x_scale: Any, w_scale: Any, channels: int, alpha: float = 1.0) -> QuantParams:
    """int32 parameters of a Conv/MatMul/Gemm bias: scale ``x_scale · w_scale[n]``, zero point 0.

    The integer kernels add the bias to the int32 accumulator, whose unit is the product
    of the input and weight scales (design §2); the product is taken in float32, as
    onnxruntime's quantizer and kernels do. `x_scale` must be one value; `w_scale` one
    value or one per output channel; a Gemm's `alpha` multiplies last.
    """
    xs = np.asarray(x_scale, dtype=np.float32).reshape(-1)
    ws = np.asarray(w_scale, dtype=np.float32).reshape(-1)
    if xs.size != 1:
        raise QuantParamsError(f"a bias needs a per-tensor input scale, got {xs.size} scales")
    if ws.size not in (1, channels):
        raise QuantParamsError(
            f"weight scale of size {ws.size} does not match {channels} output channels"
        )
    scale = xs[0] * ws
    if alpha != 1.0:
        scale = scale * np.float32(alpha)
    scale = np.broadcast_to(scale, (channels,)).astype(np.float32)
    return QuantParams(scale, np.zeros(channels, np.int32), np.int32)
