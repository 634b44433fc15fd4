"""Elementwise ONNX ops in numpy: arithmetic, activations, comparison, Cast.

Every kernel returns an ndarray of the dtype ONNX specifies (numpy returns
scalars for 0-d operands and upcasts mixed-type operands; both are undone here)
and never writes to its inputs, which other nodes may share.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx

from qlinear.runtime.kernels import elementwise as ew_kernels
from qlinear.runtime.registry import Kernel, NodeSpec, register

Binary = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _nd(value: np.ndarray | np.generic) -> np.ndarray:
    """numpy ufuncs return scalars for 0-d operands; kernels must return arrays."""
    return value if type(value) is np.ndarray else np.asarray(value)


def _is_int(x: np.ndarray) -> bool:
    return x.dtype.kind in "iu"


# --------------------------------------------------------------------------- binary


def _legacy_broadcast(spec: NodeSpec, fn: Binary) -> Binary:
    """Opsets < 7 broadcast B only with broadcast=1, aligned at `axis` (numpy aligns trailing)."""
    if spec.opset >= 7 or not spec.attr("broadcast", 0) or spec.attr("axis") is None:
        return fn
    axis = int(spec.attr("axis"))

    def run(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        start = axis + a.ndim if axis < 0 else axis
        trailing = a.ndim - start - b.ndim
        return fn(a, b.reshape(b.shape + (1,) * trailing) if trailing > 0 else b)

    return run


def _ufunc_kernel(ufunc: np.ufunc) -> Binary:
    def run(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return _nd(ufunc(a, b))

    return run


@register(["Add", "Sub", "Mul", "Equal"], since=1)
def _arith(spec: NodeSpec) -> Kernel:
    ufunc = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Equal": np.equal}
    return _legacy_broadcast(spec, _ufunc_kernel(ufunc[spec.op_type]))


def _int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer Div truncates toward zero like C (numpy floors); x/0 gives 0, MIN/-1 wraps."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        q = np.asarray(np.floor_divide(a, b))
        if a.dtype.kind == "i" or b.dtype.kind == "i":
            inexact = np.remainder(a, b) != 0
            inexact &= (a < 0) != (b < 0)
            np.add(q, inexact, out=q, casting="unsafe")
    return q


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if _is_int(a):
        return _int_div(a, b)
    return _nd(np.true_divide(a, b))


@register("Div", since=1)
def _div_factory(spec: NodeSpec) -> Kernel:
    return _legacy_broadcast(spec, _div)


def _pow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pow's result has the base's dtype whatever the exponent's (numpy would upcast)."""
    if not _is_int(a):
        return _nd(np.power(a, b if b.dtype == a.dtype else b.astype(a.dtype)))
    if _is_int(b) and not (b < 0).any():
        return _nd(np.power(a, b.astype(a.dtype, copy=False)))
    # int base with a float or negative exponent: compute in float64, truncate like C.
    return np.asarray(np.power(a.astype(np.float64), b.astype(np.float64))).astype(a.dtype)


@register("Pow", since=1)
def _pow_factory(spec: NodeSpec) -> Kernel:
    exponent = spec.const(1)
    if exponent is not None and exponent.size == 1 and exponent.dtype.kind == "f":
        e = float(exponent.reshape(-1)[0])
        shape = exponent.shape

        def fast(ufunc: np.ufunc) -> Kernel:
            def run(a: np.ndarray, b: np.ndarray) -> np.ndarray:
                if _is_int(a) or len(shape) > a.ndim:
                    return _pow(a, b)
                return _nd(ufunc(a))

            return run

        # x**2 and x**0.5 are common (norm decompositions); dedicated ufuncs are faster.
        if e == 2.0:
            return fast(np.square)
        if e == 0.5:
            return fast(np.sqrt)
    return _legacy_broadcast(spec, _pow)


@register("Sum", since=1)
def _sum(spec: NodeSpec) -> Kernel:
    def run(*xs: np.ndarray) -> np.ndarray:
        if len(xs) == 1:
            return xs[0]
        acc = np.asarray(np.add(xs[0], xs[1]))
        for x in xs[2:]:
            if np.broadcast_shapes(acc.shape, x.shape) == acc.shape:
                np.add(acc, x, out=acc)  # acc is ours: accumulate in place
            else:
                acc = np.asarray(np.add(acc, x))
        return acc

    return run


@register("Where", since=9)
def _where(spec: NodeSpec) -> Kernel:
    def run(cond: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.where(cond, x, y)

    return run


# ------------------------------------------------------------------------------ unary


def _unary(fn: Callable[[np.ndarray], np.ndarray]) -> Kernel:
    def run(x: np.ndarray) -> np.ndarray:
        return _nd(fn(x))

    return run


@register("Identity", since=1)
def _identity(spec: NodeSpec) -> Kernel:
    # Returning the input itself is safe: no kernel writes to its inputs.
    # Also passes sequences and optionals through unchanged.
    return lambda x: x


@register("Sqrt", since=1)
def _sqrt(spec: NodeSpec) -> Kernel:
    return _unary(np.sqrt)


@register("Tanh", since=1)
def _tanh(spec: NodeSpec) -> Kernel:
    return _unary(np.tanh)


@register("Erf", since=9)
def _erf(spec: NodeSpec) -> Kernel:
    return ew_kernels.erf


@register("Relu", since=1)
def _relu(spec: NodeSpec) -> Kernel:
    def run(x: np.ndarray) -> np.ndarray:
        return _nd(np.maximum(x, x.dtype.type(0)))

    return run


@register("LeakyRelu", since=1)
def _leaky_relu(spec: NodeSpec) -> Kernel:
    alpha = float(spec.attr("alpha", 0.01))

    def run(x: np.ndarray) -> np.ndarray:
        scaled = np.asarray(x * x.dtype.type(alpha))
        if 0.0 <= alpha <= 1.0:  # max(x, αx) is the leaky relu for 0 ≤ α ≤ 1
            return np.maximum(x, scaled, out=scaled)
        if alpha > 1.0:
            return np.minimum(x, scaled, out=scaled)
        return np.where(x < 0, scaled, x)

    return run


def _in_float32_if_narrow(fn: Callable[[np.ndarray], np.ndarray]) -> Callable:
    """float16/bfloat16 lose too much inside exp/tanh formulas: compute in float32, round once."""

    @functools.wraps(fn)
    def run(x: np.ndarray) -> np.ndarray:
        if x.dtype.itemsize >= 4:
            return fn(x)
        return fn(x.astype(np.float32)).astype(x.dtype)

    return run


@_in_float32_if_narrow
def _sigmoid(x: np.ndarray) -> np.ndarray:
    """1/(1+e^-x): accurate for both signs; e^-x overflowing to inf correctly gives 0."""
    e = _nd(np.negative(x))
    with np.errstate(over="ignore"):
        np.exp(e, out=e)
    e += x.dtype.type(1)
    return np.reciprocal(e, out=e)


@register("Sigmoid", since=1)
def _sigmoid_factory(spec: NodeSpec) -> Kernel:
    return _unary(_sigmoid)


def _hard_sigmoid(x: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    t = x.dtype.type
    r = np.asarray(x * t(alpha))
    r += t(beta)
    np.clip(r, t(0), t(1), out=r)
    return r


@register("HardSigmoid", since=1)
def _hard_sigmoid_factory(spec: NodeSpec) -> Kernel:
    alpha = float(spec.attr("alpha", 0.2))
    beta = float(spec.attr("beta", 0.5))
    return lambda x: _hard_sigmoid(x, alpha, beta)


@register("HardSwish", since=14)
def _hard_swish(spec: NodeSpec) -> Kernel:
    def run(x: np.ndarray) -> np.ndarray:
        r = _hard_sigmoid(x, 1.0 / 6.0, 0.5)
        r *= x
        return r

    return run


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@_in_float32_if_narrow
def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), in x's dtype, in place on temporaries."""
    t = x.dtype.type
    r = np.asarray(x * x)
    r *= t(0.044715)
    r += t(1)
    r *= x
    r *= t(_SQRT_2_OVER_PI)
    np.tanh(r, out=r)
    r += t(1)
    r *= x
    r *= t(0.5)
    return r


@register("Gelu", since=20)
def _gelu(spec: NodeSpec) -> Kernel:
    approximate = spec.attr("approximate", "none")
    if approximate == "tanh":
        return _gelu_tanh
    if approximate == "none":
        return ew_kernels.gelu_exact
    raise ValueError(f"{spec.describe()}: unknown Gelu approximate={approximate!r}")


@register("Clip", since=1)
def _clip(spec: NodeSpec) -> Kernel:
    """Clip bounds are attributes before opset 11 and optional inputs after (None = unbounded)."""
    if spec.opset < 11:
        attr_lo, attr_hi = spec.attr("min"), spec.attr("max")

        def bounds(x: np.ndarray, lo: object, hi: object) -> tuple:
            t = x.dtype.type
            return (
                None if attr_lo is None else t(attr_lo),
                None if attr_hi is None else t(attr_hi),
            )
    else:
        const_lo = spec.const(1) if spec.has_input(1) else None
        const_hi = spec.const(2) if spec.has_input(2) else None
        lo_from_input = spec.has_input(1) and const_lo is None
        hi_from_input = spec.has_input(2) and const_hi is None

        def bounds(x: np.ndarray, lo: object, hi: object) -> tuple:
            return (lo if lo_from_input else const_lo, hi if hi_from_input else const_hi)

    def run(x: np.ndarray, lo: np.ndarray | None = None, hi: np.ndarray | None = None):
        lo, hi = bounds(x, lo, hi)
        if lo is None and hi is None:
            return x
        if hi is None:
            return _nd(np.maximum(x, lo))
        if lo is None:
            return _nd(np.minimum(x, hi))
        r = np.asarray(np.maximum(x, lo))
        return np.minimum(r, hi, out=r)  # min > max gives max everywhere, as ONNX says

    return run


# ------------------------------------------------------------------------------- Cast

_FLOAT8_SATURATING = {
    onnx.TensorProto.FLOAT8E4M3FN,
    onnx.TensorProto.FLOAT8E4M3FNUZ,
    onnx.TensorProto.FLOAT8E5M2,
    onnx.TensorProto.FLOAT8E5M2FNUZ,
}


def _cast_target(spec: NodeSpec) -> int:
    to = spec.attr("to")
    if isinstance(to, str):  # opset 1 names the type ("FLOAT")
        return onnx.TensorProto.DataType.Value(to.upper())
    return int(to)


def cast_kernel(to: int, saturate: bool = True, round_mode: str = "up") -> Kernel:
    """The Cast kernel to ONNX type `to` (saturate/round_mode: float8 rules, opset 19+/24+)."""
    if to == onnx.TensorProto.STRING:
        return lambda x: x.astype(np.str_).astype(object)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(to)

    if to in _FLOAT8_SATURATING and saturate:
        info = ml_dtypes.finfo(dtype)
        lo, hi = float(info.min), float(info.max)

        def saturating(x: np.ndarray) -> np.ndarray:
            # clip keeps NaN and sends ±inf to ±max, as the saturate table asks
            if x.dtype.kind not in "f" and x.dtype != ml_dtypes.bfloat16:
                x = x.astype(np.float32)
            return np.clip(x, x.dtype.type(lo), x.dtype.type(hi)).astype(dtype)

        return saturating

    if to == getattr(onnx.TensorProto, "FLOAT8E8M0", None):
        from onnx.numpy_helper import to_float8e8m0  # vectorised numpy, onnx >= 1.18

        return lambda x: to_float8e8m0(x, saturate, round_mode).astype(dtype)

    def run(x: np.ndarray) -> np.ndarray:
        if x.dtype == dtype:
            return x
        return np.asarray(x).astype(dtype)

    return run


@register("Cast", since=1)
def _cast(spec: NodeSpec) -> Kernel:
    saturate = bool(spec.attr("saturate", 1)) if spec.opset >= 19 else True
    return cast_kernel(_cast_target(spec), saturate, spec.attr("round_mode", "up"))
