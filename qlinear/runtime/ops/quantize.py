"""QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear on top of `qlinear.quant`.

The factories read attributes and, when scale/zero point are constants, build the
`QuantParams` once per input shape; the kernels only call `quantize_affine` /
`dequantize_affine` (the one implementation of the arithmetic), or, for float32 <->
8/16-bit integers per-tensor or per-axis, the single-pass kernels of
`kernels/qelementwise.py`, which do the same float32 operations in the same order
(bit-identical, asserted by hypothesis tests). A DequantizeLinear
whose input is constant too (a weight) is evaluated at plan time.

Deliberate differences from onnx.reference (each tested):
- quotients beyond int32 range, ±Inf and NaN saturate (NaN -> qmin) as in
  onnxruntime, instead of onnx.reference's undefined float->int32 cast;
- float16/bfloat16 inputs divide in float32 (onnx.reference divides in float16 when
  the scale is float16), the ``precision`` attribute is honoured only for FLOAT;
- DynamicQuantizeLinear on an all-zero input returns scale 1.0 (onnxruntime; the
  reference returns 1/255), ignores NaN when taking min/max (onnxruntime) and raises
  on ±Inf, where both produce an infinite scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from onnx import TensorProto
from onnx.helper import tensor_dtype_to_np_dtype

from qlinear.errors import QuantParamsError, UnsupportedOpError
from qlinear.quant import (
    QuantParams,
    choose_qparams,
    dequantize_affine,
    from_onnx,
    from_onnx_type,
    quantize_affine,
)
from qlinear.quant.granularity import normalize_axis
from qlinear.runtime.kernels import qelementwise as qk
from qlinear.runtime.kernels.parallel import unrecorded
from qlinear.runtime.registry import NodeSpec, register

#: Integer types the single-pass kernels handle (|rounded value| < 2^22 after clamping).
_FAST_INTS = tuple(np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16))


def _fast_layout(
    qp: QuantParams, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(scale[C], zero_point[C], inner) when qp is per-tensor or per-axis over `shape`.

    The fast kernels then index channel ``(flat // inner) % C``; blocked or
    rank-mismatched parameters return None (the numpy reference path handles them).
    """
    if qp.dtype not in _FAST_INTS:
        return None
    size = int(np.prod(shape)) if shape else 1
    # the zero point in the output type: with an int32 one LLVM widens the whole
    # quantize loop to 32 bits (34 -> 23.5 us for a [1,3,224,224] image)
    zp = qp.zero_point.astype(qp.dtype, copy=False)
    if qp.is_per_tensor:
        return qp.scale.reshape(1), zp.reshape(1), max(size, 1)
    if qp.scale.ndim != len(shape):
        return None
    ax = qp.channel_axis()
    if ax is None or qp.scale.shape[ax] != shape[ax]:
        return None
    inner = int(np.prod(shape[ax + 1 :])) if ax + 1 < len(shape) else 1
    return qp.scale.reshape(-1), zp.reshape(-1), max(inner, 1)


def _output_dtype_attr(spec: NodeSpec) -> np.dtype | None:
    elem = spec.attr("output_dtype", 0)
    if not elem:
        return None
    try:
        return from_onnx_type(elem)
    except QuantParamsError as exc:
        raise UnsupportedOpError(f"{spec.describe()}: output_dtype {elem}: {exc}") from exc


def _ragged_pad(shape: Sequence[int], scale: np.ndarray, axis: int, block_size: int) -> int:
    """How many elements to pad along `axis` so a ragged last block becomes whole."""
    if not block_size or scale.size == 1 or scale.ndim != len(shape):
        return 0
    ax = normalize_axis(axis, len(shape))
    d = shape[ax]
    if d % block_size == 0 or -(-d // block_size) != scale.shape[ax]:
        return 0  # exact, or wrong (from_onnx will say why)
    return scale.shape[ax] * block_size - d


def _pad_axis(x: np.ndarray, axis: int, n: int) -> np.ndarray:
    pad_shape = list(x.shape)
    pad_shape[axis] = n
    return np.concatenate([x, np.zeros(pad_shape, dtype=x.dtype)], axis=axis)


class _Planner:
    """Turns (x shape, scale, zero point) into QuantParams; caches when they are constant."""

    def __init__(self, spec: NodeSpec) -> None:
        self.spec = spec
        self.axis = int(spec.attr("axis", 1))
        self.block_size = int(spec.attr("block_size", 0))
        scale = spec.const(1)
        zp = spec.const(2) if spec.has_input(2) else None
        self.constant = scale is not None and (zp is not None or not spec.has_input(2))
        self._cache: dict[tuple, tuple[QuantParams, int, int]] = {}

    def plan(
        self,
        shape: tuple[int, ...],
        scale: np.ndarray,
        zero_point: np.ndarray | None,
        dtype: np.dtype | None,
    ) -> tuple[QuantParams, int, int]:
        """(params for the padded shape, axis, padding) for an input of `shape`.

        `dtype` is the quantized dtype when there is no zero point to tell it.
        """
        key = (shape, dtype)
        if self.constant and key in self._cache:
            return self._cache[key]
        scale = np.asarray(scale)
        pad = _ragged_pad(shape, scale, self.axis, self.block_size)
        axis = normalize_axis(self.axis, len(shape)) if pad else 0
        padded = list(shape)
        if pad:
            padded[axis] += pad
        try:
            qp = from_onnx(
                scale,
                zero_point,
                padded,
                axis=self.axis,
                block_size=self.block_size or None,
                dtype=dtype,
            )
        except QuantParamsError as exc:
            raise QuantParamsError(f"{self.spec.describe()}: {exc}") from exc
        planned = (qp, axis, pad)
        if self.constant:
            self._cache[key] = planned
        return planned


@register("QuantizeLinear", since=10)
def _quantize_linear(spec: NodeSpec) -> Callable[..., np.ndarray]:
    precision = spec.attr("precision", 0)
    if precision not in (0, TensorProto.FLOAT):
        raise UnsupportedOpError(f"{spec.describe()}: precision={precision} is not supported")
    saturate = bool(spec.attr("saturate", 1))
    planner = _Planner(spec)
    out_dtype = _output_dtype_attr(spec)

    fast_plans: dict[tuple[int, ...], tuple] = {}  # shape -> fast-kernel args (constant qp)

    def run(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None) -> np.ndarray:
        if x.dtype == np.float32 and (cached := fast_plans.get(x.shape)) is not None:
            return qk.quantize_f32(x, *cached)
        qp, axis, pad = planner.plan(x.shape, scale, zero_point, out_dtype)
        if pad:
            y = quantize_affine(_pad_axis(x, axis, pad), qp, saturate=saturate)
            return y.take(np.arange(x.shape[axis]), axis=axis)
        if x.dtype == np.float32 and (fast := _fast_layout(qp, x.shape)) is not None:
            info = np.iinfo(qp.dtype)
            args = (*fast, int(info.min), int(info.max), qp.dtype)
            if planner.constant:
                fast_plans[x.shape] = args
            return qk.quantize_f32(x, *args)
        return quantize_affine(x, qp, saturate=saturate)

    return run


@register("DequantizeLinear", since=10)
def _dequantize_linear(spec: NodeSpec) -> Callable[..., np.ndarray]:
    planner = _Planner(spec)
    elem = spec.attr("output_dtype", 0)
    out_dtype = np.dtype(tensor_dtype_to_np_dtype(elem)) if elem else None

    fast_plans: dict[tuple, tuple] = {}  # (shape, dtype) -> fast-kernel args (constant qp)
    final_dtype = out_dtype or (np.asarray(spec.const(1)).dtype if spec.const(1) is not None
                                else None)

    def run(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None) -> np.ndarray:
        if (cached := fast_plans.get((x.shape, x.dtype))) is not None:
            y = qk.dequantize(x, *cached)
            if final_dtype == np.float32:
                return y
            unrecorded()  # numpy's cast
            return y.astype(final_dtype, copy=False)
        if zero_point is not None and np.asarray(zero_point).dtype != x.dtype:
            raise QuantParamsError(
                f"{spec.describe()}: zero point dtype {np.asarray(zero_point).dtype} "
                f"differs from input dtype {x.dtype}"
            )
        qp, axis, pad = planner.plan(x.shape, scale, zero_point, x.dtype)
        if pad:
            unrecorded()  # numpy
            y = dequantize_affine(_pad_axis(x, axis, pad), qp)
            y = y.take(np.arange(x.shape[axis]), axis=axis)
        elif x.dtype == qp.dtype and (fast := _fast_layout(qp, x.shape)) is not None:
            y = qk.dequantize(x, *fast)
            if planner.constant and final_dtype is not None:
                fast_plans[(x.shape, x.dtype)] = fast  # checks above passed for this dtype
        else:
            unrecorded()  # numpy
            y = dequantize_affine(x, qp)
        return y.astype(out_dtype or np.asarray(scale).dtype, copy=False)

    x_const, scale_const = spec.const(0), spec.const(1)
    if x_const is not None and scale_const is not None and planner.constant:
        # A constant (weight) DQ: compute once, hand out the same read-only array.
        folded = run(x_const, scale_const, spec.const(2) if spec.has_input(2) else None)
        folded.setflags(write=False)

        def run_folded(*_: np.ndarray | None) -> np.ndarray:
            return folded

        return run_folded
    # constant parameters: per-tensor/per-axis bytes dequantize in one run of native tasks
    run.replayable = planner.constant
    return run


@register("DynamicQuantizeLinear", since=11)
def _dynamic_quantize_linear(spec: NodeSpec) -> Callable[..., tuple[np.ndarray, ...]]:
    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if x.size == 0:
            lo = hi = np.float32(0)
        else:
            lo, hi = x.min(), x.max()
            if np.isnan(lo) or np.isnan(hi):  # NaN does not widen the range (onnxruntime)
                finite = x[~np.isnan(x)]
                lo = finite.min() if finite.size else np.float32(0)
                hi = finite.max() if finite.size else np.float32(0)
        try:
            qp = choose_qparams(lo, hi, np.uint8)
        except QuantParamsError as exc:
            raise QuantParamsError(f"{spec.describe()}: input has ±Inf: {exc}") from exc
        y = quantize_affine(x, qp)
        return (
            y,
            qp.scale.reshape(()).astype(x.dtype),
            qp.zero_point.reshape(()).astype(np.uint8),
        )

    return run
