"""com.microsoft QLinear* contrib ops and QGemm, with onnxruntime's CPU semantics.

Semantics follow ORT's CPU kernels (contrib_ops/cpu/quantization and MLAS):

- QLinearAdd: ``y = rint(a*(sa/sc) + b*(sb/sc) + (zc - (sa/sc)*za - (sb/sc)*zb))`` in
  float32, saturated (MLAS qladd).
- QLinearMul: ``y = requant((a - za)(b - zb), sa*sb/sc, zc)`` (int product, one
  requantize, the shared helper).
- QLinearGlobalAveragePool: int32 channel sum minus ``zx * N``, requantized with
  ``sx / (sy * N)`` (MLAS qlgavgpool), via the shared requantize helper.
- QLinearSoftmax over the last axis: exp from a 256-entry table of exp((i-255)·sx)
  indexed by x - rowmax (ORT does the same), float32 sum, quantize(e / sum); within one
  step of ORT. Other axes: dequantize, float softmax, quantize.
- QLinearAveragePool, QLinearSigmoid, QLinearLeakyRelu, QLinearConcat:
  dequantize, compute in float32, quantize (ORT builds 256-entry lookup tables the same
  way for the unary ones; Sigmoid uses MLAS's logistic approximation there, so we may
  differ by one step where a value sits on a rounding boundary).
- QGemm: the int8 GEMM with int32 bias and a requantized (``y_scale`` given) or float
  (no ``y_scale``) epilogue, multiplier ``alpha * sa * sb[n] (/ sy)``.

Quantize/dequantize go through `qlinear.quant`; requantization of int32 through
`qlinear.runtime.kernels.requant`. The hot paths (8-bit per-tensor quantize/dequantize,
QLinearAdd/Mul for broadcasts that collapse to 3-D, lookup tables, last-axis softmax,
global average pool) run single-pass kernels from `kernels/qelementwise.py` that do the
same float32 operations in the same order, so results are unchanged bit for bit.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from qlinear.quant import QuantParams, dequantize_affine, quantize_affine
from qlinear.runtime.kernels import qelementwise as qk
from qlinear.runtime.kernels.gemm import gemm, pack_matrix
from qlinear.runtime.kernels.parallel import unrecorded
from qlinear.runtime.kernels.requant import float_scale, output_multiplier, requantize_array
from qlinear.runtime.registry import MS_DOMAIN, Kernel, NodeSpec, register

# --------------------------------------------------------------------------- helpers


def _qp(scale: np.ndarray, zp: np.ndarray | None, dtype: np.dtype) -> QuantParams:
    """Per-tensor QuantParams from (scalar or 1-element) ONNX inputs."""
    s = np.asarray(scale, np.float32).reshape(-1)
    if s.size != 1:
        raise ValueError(f"expected a per-tensor scale, got shape {np.shape(scale)}")
    z = None if zp is None else np.asarray(zp).reshape(-1)[:1].astype(np.int32)
    return QuantParams(s.reshape(()), None if z is None else z.reshape(()), dtype)


_BYTES = (np.dtype(np.uint8), np.dtype(np.int8))


def _dequant(x: np.ndarray, scale: np.ndarray, zp: np.ndarray | None) -> np.ndarray:
    qp = _qp(scale, zp, x.dtype)
    if x.dtype in _BYTES:  # same float32 ops as dequantize_affine, one pass
        return qk.dequantize(x, qp.scale.reshape(1), qp.zero_point.reshape(1), x.size)
    return dequantize_affine(x, qp)


def _quant(y: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, dtype: np.dtype):
    y = np.asarray(y, np.float32)
    qp = _qp(scale, zp, dtype)
    if qp.dtype in _BYTES:  # same float32 ops as quantize_affine, one pass
        info = np.iinfo(qp.dtype)
        return qk.quantize_f32(y, qp.scale.reshape(1), qp.zero_point.reshape(1), y.size,
                               int(info.min), int(info.max), qp.dtype)
    return quantize_affine(y, qp)


class _BroadcastPlans:
    """Per-node cache of (a.shape, b.shape) -> qk.BinaryPlan (None: use numpy)."""

    def __init__(self) -> None:
        self._plans: dict[tuple, object] = {}

    def get(self, a: np.ndarray, b: np.ndarray, dtype: np.dtype):
        if a.dtype not in _BYTES or b.dtype not in _BYTES or np.dtype(dtype) not in _BYTES:
            return None
        key = (a.shape, b.shape)
        if key not in self._plans:
            self._plans[key] = qk.plan_binary(a.shape, b.shape)
        return self._plans[key]


def _zp(zp: np.ndarray | None) -> int:
    return 0 if zp is None else int(np.asarray(zp).reshape(-1)[0])


def _out_dtype(zp: np.ndarray | None, fallback: np.dtype) -> np.dtype:
    return np.asarray(zp).dtype if zp is not None else fallback


def _requantize(acc: np.ndarray, mult: np.ndarray, y_zp: int, dtype: np.dtype) -> np.ndarray:
    """int32 acc (any shape) with one multiplier (or one per last-axis column) -> dtype."""
    info = np.iinfo(dtype)
    flat = np.ascontiguousarray(acc, np.int32).reshape(-1, acc.shape[-1] if acc.ndim else 1)
    m = np.broadcast_to(np.asarray(mult, np.float32).reshape(-1), (flat.shape[1],))
    out = np.empty(flat.shape, dtype)
    requantize_array(flat, np.ascontiguousarray(m), int(y_zp), int(info.min), int(info.max),
                     out)
    return out.reshape(acc.shape)


def _lookup_table(fn, x_dtype, x_scale, x_zp, y_scale, y_zp) -> np.ndarray:
    """The 256 outputs indexed by the input's uint8 bit pattern."""
    dtype = _out_dtype(y_zp, x_dtype)
    domain = np.arange(256, dtype=np.uint8).view(x_dtype)
    return _quant(fn(_dequant(domain, x_scale, x_zp)), y_scale, y_zp, dtype)


def _lookup_kernel(fn, spec: NodeSpec | None = None) -> Kernel:
    """Unary ops ORT runs by 256-entry table: dequantize, fn in float32, quantize.

    With constant scales/zero points (the usual case) the table is built once at plan
    time per input dtype; each run is then one gather pass.
    """
    consts = spec.consts if spec is not None else {}
    const_ok = spec is not None and all(
        i in consts or not spec.has_input(i) for i in (1, 2, 3, 4))
    tables: dict[np.dtype, np.ndarray] = {}

    def run(x, x_scale, x_zp=None, y_scale=None, y_zp=None):
        if x.dtype not in _BYTES:  # wider types: no table, compute directly
            return _quant(fn(_dequant(x, x_scale, x_zp)), y_scale, y_zp,
                          _out_dtype(y_zp, x.dtype))
        table = tables.get(x.dtype) if const_ok else None
        if table is None:
            table = _lookup_table(fn, x.dtype, x_scale, x_zp, y_scale, y_zp)
            if const_ok:
                tables[x.dtype] = table
        return qk.lookup_u8(x, table)

    return run


# --------------------------------------------------------------------------- binary


def _constant_params(spec: NodeSpec, indices: tuple[int, ...]) -> bool:
    """True when every listed (present) input is a plan-time constant."""
    return all(i in spec.consts or not spec.has_input(i) for i in indices)


def _add_params(a_scale, a_zp, b_scale, b_zp, c_scale, c_zp):
    """(r_ac, r_bc, fixed) of QLinearAdd in float32, in MLAS's order."""
    sa, sb, sc = (np.float32(np.asarray(s).reshape(-1)[0]) for s in (a_scale, b_scale, c_scale))
    r_ac, r_bc = np.float32(sa / sc), np.float32(sb / sc)
    fixed = np.float32(np.float32(_zp(c_zp))
                       - (r_ac * np.float32(_zp(a_zp)) + r_bc * np.float32(_zp(b_zp))))
    return r_ac, r_bc, fixed


@register("QLinearAdd", domain=MS_DOMAIN, since=1)
def _qlinear_add(spec: NodeSpec) -> Kernel:
    plans = _BroadcastPlans()
    c = spec.consts
    fixed_params = (_add_params(c[1], c.get(2), c[4], c.get(5), c[6], c.get(7))
                    if _constant_params(spec, (1, 2, 4, 5, 6, 7)) else None)

    def run(a, a_scale, a_zp, b, b_scale, b_zp, c_scale, c_zp=None):
        dtype = _out_dtype(c_zp, a.dtype)
        if fixed_params is not None:
            r_ac, r_bc, fixed = fixed_params
        else:
            r_ac, r_bc, fixed = _add_params(a_scale, a_zp, b_scale, b_zp, c_scale, c_zp)
        plan = plans.get(a, b, dtype)
        if plan is not None:
            return qk.qlinear_add(a, b, plan, r_ac, r_bc, fixed, dtype)
        unrecorded()  # numpy, not native tasks
        y = a.astype(np.float32) * r_ac + (b.astype(np.float32) * r_bc + fixed)
        info = np.iinfo(dtype)
        return np.clip(np.rint(y), info.min, info.max).astype(dtype)

    # constant parameters: a call with a 3-D broadcast plan is one run of native tasks
    run.replayable = fixed_params is not None
    return run


@register("QLinearMul", domain=MS_DOMAIN, since=1)
def _qlinear_mul(spec: NodeSpec) -> Kernel:
    plans = _BroadcastPlans()
    c = spec.consts

    def params(a_scale, a_zp, b_scale, b_zp, c_scale, c_zp):
        sa, sb, sc = (np.asarray(s, np.float32).reshape(-1)[:1] for s in (a_scale, b_scale,
                                                                           c_scale))
        return output_multiplier(sa, sb, sc, 1), _zp(a_zp), _zp(b_zp), _zp(c_zp)

    fixed_params = (params(c[1], c.get(2), c[4], c.get(5), c[6], c.get(7))
                    if _constant_params(spec, (1, 2, 4, 5, 6, 7)) else None)

    def run(a, a_scale, a_zp, b, b_scale, b_zp, c_scale, c_zp=None):
        dtype = _out_dtype(c_zp, a.dtype)
        mult, za, zb, zc = fixed_params or params(a_scale, a_zp, b_scale, b_zp, c_scale, c_zp)
        plan = plans.get(a, b, dtype)
        if plan is not None:
            return qk.qlinear_mul(a, b, plan, za, zb, mult[0], zc, dtype)
        prod = (a.astype(np.int32) - _zp(a_zp)) * (b.astype(np.int32) - _zp(b_zp))
        return _requantize(np.asarray(prod, np.int32), mult, _zp(c_zp), dtype)

    return run


@register("QLinearConcat", domain=MS_DOMAIN, since=1)
def _qlinear_concat(spec: NodeSpec) -> Kernel:
    axis = int(spec.attr("axis"))

    def run(y_scale, y_zp, *triplets):
        dtype = np.asarray(y_zp).dtype
        parts = []
        for i in range(0, len(triplets), 3):
            x, s, z = triplets[i : i + 3]
            same = np.array_equal(np.asarray(s, np.float32).reshape(-1),
                                  np.asarray(y_scale, np.float32).reshape(-1)) and _zp(z) == _zp(
                y_zp) and x.dtype == dtype
            parts.append(x if same else _quant(_dequant(x, s, z), y_scale, y_zp, dtype))
        return np.concatenate(parts, axis=axis)

    return run


# --------------------------------------------------------------------------- pooling


@register("QLinearGlobalAveragePool", domain=MS_DOMAIN, since=1)
def _qlinear_global_average_pool(spec: NodeSpec) -> Kernel:
    channels_last = bool(spec.attr("channels_last", 0))

    def run(x, x_scale, x_zp, y_scale, y_zp):
        axes = tuple(range(1, x.ndim - 1)) if channels_last else tuple(range(2, x.ndim))
        size = int(np.prod([x.shape[a] for a in axes]))
        sx, sy = np.float32(np.asarray(x_scale).reshape(-1)[0]), np.float32(
            np.asarray(y_scale).reshape(-1)[0])
        mult = np.array([sx / np.float32(sy * np.float32(size))], np.float32)
        if x.dtype in _BYTES and x.ndim >= 2 and np.dtype(_out_dtype(y_zp, x.dtype)) == x.dtype:
            return qk.qlinear_global_avg_pool(x, channels_last, _zp(x_zp), mult[0], _zp(y_zp))
        unrecorded()  # numpy, not native tasks
        acc = x.astype(np.int32).sum(axis=axes, keepdims=True, dtype=np.int32)
        acc -= np.int32(_zp(x_zp) * size)
        return _requantize(acc.reshape(-1, 1), mult, _zp(y_zp), x.dtype).reshape(acc.shape)

    run.replayable = channels_last  # the channels-last byte path is one run of native tasks
    return run


@register("QLinearAveragePool", domain=MS_DOMAIN, since=1)
def _qlinear_average_pool(spec: NodeSpec) -> Kernel:
    from qlinear.runtime.ops.nn import _average_pool

    if spec.attr("channels_last", 0):
        raise NotImplementedError("channels_last QLinearAveragePool")
    attrs = {k: v for k, v in spec.attrs.items() if k != "channels_last"}
    proto = helper.make_node("AveragePool", ["x"], ["y"], **attrs)
    pool = _average_pool(NodeSpec(proto=proto, opset=19))

    def run(x, x_scale, x_zp, y_scale, y_zp):
        y = pool(_dequant(x, x_scale, x_zp))
        y = y[0] if isinstance(y, (tuple, list)) else y
        return _quant(y, y_scale, y_zp, _out_dtype(y_zp, x.dtype))

    return run


# --------------------------------------------------------------------------- unary


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (np.float32(1) / (np.float32(1) + np.exp(-x.astype(np.float32)))).astype(np.float32)


@register("QLinearSigmoid", domain=MS_DOMAIN, since=1)
def _qlinear_sigmoid(spec: NodeSpec) -> Kernel:
    return _lookup_kernel(_sigmoid, spec)


@register("QLinearLeakyRelu", domain=MS_DOMAIN, since=1)
def _qlinear_leaky_relu(spec: NodeSpec) -> Kernel:
    alpha = np.float32(spec.attr("alpha", 0.01))
    return _lookup_kernel(lambda x: np.where(x >= 0, x, x * alpha).astype(np.float32), spec)


@register("QLinearSoftmax", domain=MS_DOMAIN, since=1)
def _qlinear_softmax(spec: NodeSpec) -> Kernel:
    axis = int(spec.attr("axis", -1))

    def run(x, x_scale, x_zp, y_scale, y_zp):
        dtype = _out_dtype(y_zp, x.dtype)
        last = x.ndim and (axis % x.ndim) == x.ndim - 1
        if last and x.dtype in _BYTES and np.dtype(dtype) in _BYTES and x.size:
            sx = np.float32(np.asarray(x_scale).reshape(-1)[0])
            sy = np.float32(np.asarray(y_scale).reshape(-1)[0])
            return qk.qlinear_softmax_last(x, sx, sy, _zp(y_zp), dtype)
        xf = _dequant(x, x_scale, x_zp)
        e = np.exp(xf - xf.max(axis=axis, keepdims=True))
        y = e / e.sum(axis=axis, keepdims=True, dtype=np.float32)
        return _quant(y, y_scale, y_zp, _out_dtype(y_zp, x.dtype))

    return run


# --------------------------------------------------------------------------- QGemm


@register("QGemm", domain=MS_DOMAIN, since=1)
def _qgemm(spec: NodeSpec) -> Kernel:
    if spec.attr("transA", 0):
        raise NotImplementedError("QGemm transA=1")
    trans_b = bool(spec.attr("transB", 0))
    alpha = np.float32(spec.attr("alpha", 1.0))
    b_const, b_zp_const = spec.consts.get(3), spec.consts.get(5)

    def pack(b: np.ndarray, b_zp: np.ndarray):
        mat = np.ascontiguousarray(b.T if trans_b else b)
        zp = np.broadcast_to(np.asarray(b_zp).astype(np.int32).reshape(-1), (mat.shape[1],))
        return pack_matrix(mat, zp)

    packed = pack(b_const, b_zp_const) if b_const is not None and b_zp_const is not None else None

    def params(p, a_scale, b_scale, c, y_scale):
        """(bias, fscale or mult): per-column epilogue parameters."""
        n = p.cols
        w_scale = np.broadcast_to(np.asarray(b_scale, np.float32).reshape(-1), (n,)) * alpha
        bias = None if c is None else np.broadcast_to(
            np.asarray(c, np.int32).reshape(-1), (n,)).astype(np.int32)
        if y_scale is None:
            return bias, float_scale(a_scale, w_scale, n)
        return bias, output_multiplier(a_scale, w_scale, y_scale, n)

    # plan time: the same parameter arrays every call (also keeps gemm's launch memo hot)
    fixed = None
    if packed is not None and all(
        spec.const(i) is not None or not spec.has_input(i) for i in (1, 4, 6, 7)
    ):
        fixed = params(packed, spec.const(1), spec.const(4), spec.const(6), spec.const(7))

    def run(a, a_scale, a_zp, b, b_scale, b_zp, c=None, y_scale=None, y_zp=None):
        p = packed if packed is not None else pack(b, b_zp)
        bias, scale = fixed if fixed is not None else params(p, a_scale, b_scale, c, y_scale)
        a2 = a.reshape(-1, a.shape[-1])
        if y_scale is None:
            return gemm(a2, _zp(a_zp), p, out_dtype=np.float32, bias=bias, fscale=scale)
        return gemm(a2, _zp(a_zp), p, out_dtype=np.asarray(y_zp).dtype, bias=bias,
                    mult=scale, y_zp=_zp(y_zp))

    run.replayable = fixed is not None  # packed constant weights: the GEMM's native tasks
    return run
