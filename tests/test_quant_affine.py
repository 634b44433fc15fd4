"""quantize_affine / dequantize_affine / choose_qparams against onnx.reference, bit-exactly."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx.helper import np_dtype_to_tensor_dtype
from onnx.reference import ReferenceEvaluator

from qlinear.errors import QuantParamsError
from qlinear.quant import (
    PerAxis,
    PerBlock,
    PerGroup,
    PerTensor,
    QuantParams,
    block_size_for,
    choose_qparams,
    choose_qparams_for_tensor,
    dequantize_affine,
    quant_dtype,
    quantize_affine,
    to_onnx,
)

DTYPES = [np.int8, np.uint8, np.int16, np.uint16, ml_dtypes.int4, ml_dtypes.uint4]
ALL_INT_DTYPES = [*DTYPES, ml_dtypes.int2, ml_dtypes.uint2]
SETTINGS = settings(max_examples=150, deadline=None)


def run_reference(op: str, inputs: list[np.ndarray], attrs: dict, opset: int = 21) -> np.ndarray:
    """One-node model through onnx.reference (the independent implementation)."""
    names = ["x", "s", "z"][: len(inputs)]
    node = helper.make_node(op, names, ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(n, np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in zip(names, inputs, strict=True)
        ],
        [helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, dict(zip(names, inputs, strict=True)))[0]


def assert_identical(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    if got.dtype.kind == "f":
        assert np.array_equal(
            got.view(np.uint32 if got.itemsize == 4 else np.uint16),
            want.view(np.uint32 if want.itemsize == 4 else np.uint16),
        )
    else:
        assert np.array_equal(got.astype(np.int64), want.astype(np.int64)), (got, want)


# -- strategies ---------------------------------------------------------------------------


@st.composite
def layouts(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(tensor shape, scale shape): per-tensor, per-axis, ONNX-blocked or general blocks."""
    rank = draw(st.integers(0, 4))
    kind = draw(st.sampled_from(["tensor", "axis", "group", "block"] if rank else ["tensor"]))
    if kind == "tensor":
        shape = tuple(draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank)))
        return shape, (1,) * rank
    if kind == "axis":
        shape = tuple(draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank)))
        axis = draw(st.integers(0, rank - 1))
        return shape, tuple(d if i == axis else 1 for i, d in enumerate(shape))
    if kind == "group":
        axis = draw(st.integers(0, rank - 1))
        block, nblocks = draw(st.integers(1, 4)), draw(st.integers(1, 3))
        shape = [draw(st.integers(1, 4)) for _ in range(rank)]
        shape[axis] = block * nblocks
        scale_shape = list(shape)
        scale_shape[axis] = nblocks
        return tuple(shape), tuple(scale_shape)
    scale_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    block = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    return tuple(s * b for s, b in zip(scale_shape, block, strict=True)), scale_shape


def random_scale(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> np.ndarray:
    if kind == "pow2":  # x / scale exact: exercises .5 ties precisely
        return np.ldexp(np.float32(1), rng.integers(-20, 20, shape)).astype(np.float32)
    if kind == "tiny":
        return (rng.uniform(1, 10, shape) * 1e-30).astype(np.float32)
    if kind == "huge":
        return (rng.uniform(1, 10, shape) * 1e30).astype(np.float32)
    return np.exp(rng.uniform(-12, 6, shape)).astype(np.float32)


def random_zero_point(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    q = quant_dtype(dtype)
    extremes = np.array([q.qmin, q.qmax, 0 if q.signed else q.qmin], dtype=np.int64)
    zp = rng.integers(q.qmin, q.qmax + 1, shape)
    use_extreme = rng.random(shape) < 0.3
    return np.where(use_extreme, rng.choice(extremes, shape), zp).astype(np.int32)


def random_input(
    rng: np.random.Generator, scale_full: np.ndarray, shape: tuple[int, ...], dtype
) -> np.ndarray:
    """Values around the representable range in units of the scale: ties, in range,
    saturating both ways, up to quotients of 1e9 (still inside int32, where
    onnx.reference's float->int32 cast is defined)."""
    q = quant_dtype(dtype)
    span = float(q.qmax - q.qmin)
    units = rng.uniform(-2 * span, 2 * span, shape)
    pick = rng.random(shape)
    units = np.where(pick < 0.25, np.round(units) + 0.5, units)  # exact .5 ties
    units = np.where((pick >= 0.25) & (pick < 0.35), rng.uniform(-1e9, 1e9, shape), units)
    units = np.where((pick >= 0.35) & (pick < 0.4), np.round(units), units)
    with np.errstate(over="ignore"):
        x = np.asarray(units * scale_full).astype(np.float32)
        return np.where(np.abs(x / scale_full) < 2.0**30, x, np.float32(0))


# -- quantize / dequantize vs onnx.reference ---------------------------------------------


@SETTINGS
@given(
    layout=layouts(),
    dtype=st.sampled_from(ALL_INT_DTYPES),
    scale_kind=st.sampled_from(["pow2", "tiny", "huge", "any"]),
    with_zp=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantize_matches_onnx_reference(layout, dtype, scale_kind, with_zp, seed) -> None:
    shape, scale_shape = layout
    rng = np.random.default_rng(seed)
    scale = random_scale(rng, scale_shape, scale_kind)
    zp = random_zero_point(rng, scale_shape, dtype) if with_zp else None
    qp = QuantParams(scale, zp, dtype)
    scale_full = np.broadcast_to(qp.expand(shape)[0], shape)
    x = random_input(rng, scale_full, shape, dtype)
    try:
        s_onnx, z_onnx, attrs = to_onnx(qp, shape)
    except QuantParamsError:  # blocks along 2+ axes: not expressible in ONNX
        s_full, z_full = (np.broadcast_to(a, shape) for a in qp.expand(shape))
        qp_full = QuantParams(s_full, z_full, dtype)
        s_onnx, z_onnx, attrs = to_onnx(qp_full, shape)
    inputs = [x, s_onnx, z_onnx] if with_zp else [x, s_onnx]
    if not with_zp:
        attrs = {**attrs, "output_dtype": np_dtype_to_tensor_dtype(np.dtype(dtype))}
    want = run_reference("QuantizeLinear", inputs, attrs)
    assert_identical(quantize_affine(x, qp), want)


@SETTINGS
@given(
    layout=layouts(),
    dtype=st.sampled_from(ALL_INT_DTYPES),
    scale_kind=st.sampled_from(["pow2", "tiny", "huge", "any"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_dequantize_matches_onnx_reference(layout, dtype, scale_kind, seed) -> None:
    shape, scale_shape = layout
    rng = np.random.default_rng(seed)
    q = quant_dtype(dtype)
    qp = QuantParams(
        random_scale(rng, scale_shape, scale_kind),
        random_zero_point(rng, scale_shape, dtype),
        dtype,
    )
    xq = rng.integers(q.qmin, q.qmax + 1, shape).astype(dtype)
    try:
        s_onnx, z_onnx, attrs = to_onnx(qp, shape)
    except QuantParamsError:
        s_full, z_full = (np.broadcast_to(a, shape) for a in qp.expand(shape))
        s_onnx, z_onnx, attrs = to_onnx(QuantParams(s_full, z_full, dtype), shape)
    want = run_reference("DequantizeLinear", [xq, s_onnx, z_onnx], attrs)
    assert_identical(dequantize_affine(xq, qp), want)


@pytest.mark.parametrize("dtype", ALL_INT_DTYPES)
def test_ties_round_half_to_even(dtype) -> None:
    q = quant_dtype(dtype)
    zp = 0 if q.signed else q.qmin
    qp = QuantParams(np.float32(1), zp, dtype)
    x = np.arange(q.qmin, q.qmax, dtype=np.float32) + np.float32(0.5) - zp
    got = quantize_affine(x, qp).astype(np.int64)
    want = np.clip(np.round(x) + zp, q.qmin, q.qmax)  # np.round is half-to-even
    assert np.array_equal(got, want)


@pytest.mark.parametrize("dtype", [*ALL_INT_DTYPES, np.int32])
def test_out_of_int32_range_inf_nan_saturate(dtype) -> None:
    """Where onnx.reference's float->int32 cast is undefined we saturate, like onnxruntime:
    +big -> qmax, -big -> qmin, NaN -> qmin."""
    q = quant_dtype(dtype)
    qp = QuantParams(np.float32(1e-30), 1 if q.qmax > 1 else 0, dtype)
    x = np.array([1.0, -1.0, np.inf, -np.inf, np.nan, 3e9 * 1e-30, 0.0], np.float32)
    got = quantize_affine(x, qp).astype(np.int64).tolist()
    assert got == [q.qmax, q.qmin, q.qmax, q.qmin, q.qmin, q.qmax, qp.zero_point.item()]


def test_int32_quantize_keeps_bounds_exact() -> None:
    qp = QuantParams(np.float32(1), 0, np.int32)
    x = np.array([2.0**31, -(2.0**31), 2.0**40, 12345], np.float64)
    assert quantize_affine(x, qp).tolist() == [2**31 - 1, -(2**31), 2**31 - 1, 12345]


def test_float64_and_int32_inputs_divide_like_onnx_reference() -> None:
    rng = np.random.default_rng(1)
    qp = QuantParams(np.float32(0.37), 3, np.int16)
    for x in (rng.normal(0, 1000, 64), rng.integers(-5000, 5000, 64).astype(np.int32)):
        want = run_reference(
            "QuantizeLinear", [x, np.float32(0.37).reshape(()), np.array(3, np.int16)], {}
        )
        assert_identical(quantize_affine(x, qp), want)


def test_dequantize_rejects_dtype_mismatch() -> None:
    with pytest.raises(QuantParamsError, match="int8"):
        dequantize_affine(np.zeros(3, np.int8), QuantParams(np.float32(1), 0, np.uint8))


# -- choose_qparams ----------------------------------------------------------------------

finite = st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32)


@SETTINGS
@given(a=finite, b=finite, dtype=st.sampled_from(DTYPES), symmetric=st.booleans())
def test_choose_qparams_covers_range_and_zero(a, b, dtype, symmetric) -> None:
    lo, hi = min(a, b), max(a, b)
    qp = choose_qparams(lo, hi, dtype, symmetric=symmetric)
    q = quant_dtype(dtype)
    assert qp.scale.dtype == np.float32 and qp.scale.shape == ()
    assert qp.scale > 0 and np.isfinite(qp.scale)
    assert q.qmin <= qp.zero_point <= q.qmax
    # zero is exactly representable: quantizes to the zero point, dequantizes to 0
    zero_q = quantize_affine(np.float32(0), qp)
    assert int(zero_q) == int(qp.zero_point)
    assert dequantize_affine(zero_q, qp) == 0
    if symmetric:
        assert int(qp.zero_point) == (0 if q.signed else (q.qmax + 1) // 2)
    # every value of the (zero-extended) range round-trips within half a step
    lo0, hi0 = np.float32(min(lo, 0)), np.float32(max(hi, 0))
    values = np.array([lo0, hi0, (lo0 + hi0) / 2], np.float32)
    err = np.abs(dequantize_affine(quantize_affine(values, qp), qp) - values)
    assert np.all(err <= qp.scale * (0.5 + 1e-3) + 1e-30 * abs(values).max())


@SETTINGS
@given(x=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=20))
def test_choose_qparams_uint8_is_dynamic_quantize_linear(x) -> None:
    """Asymmetric uint8 is ONNX DynamicQuantizeLinear's formula, bit for bit."""
    arr = np.array(x, np.float32)
    want_y, want_scale, want_zp = ReferenceEvaluator(_dynamic_model()).run(None, {"x": arr})
    qp = choose_qparams(arr.min(), arr.max(), np.uint8)
    span = np.float32(max(arr.max(), 0)) - np.float32(min(arr.min(), 0))
    if span / np.float32(255) < np.finfo(np.float32).tiny:
        # all zero (onnx.reference: scale 1/255, onnxruntime: 1.0) or subnormal range
        # (both: scale 0, a useless zero point): we choose scale 1.0, zero point 0.
        assert qp.scale == 1.0 and qp.zero_point == 0
        return
    assert_identical(qp.scale.reshape(()), want_scale)
    assert int(qp.zero_point) == int(want_zp)
    assert_identical(quantize_affine(arr, qp), want_y)


def _dynamic_model():
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in "ysz"],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_choose_qparams_zero_range_is_scale_one(dtype, symmetric) -> None:
    q = quant_dtype(dtype)
    qp = choose_qparams(np.zeros(3), np.zeros(3), dtype, symmetric=symmetric)
    assert qp.scale.tolist() == [1.0, 1.0, 1.0]
    mid = (0 if q.signed else (q.qmax + 1) // 2) if symmetric else 0
    assert qp.zero_point.tolist() == [mid] * 3
    # subnormal ranges would give a zero scale: same rule
    assert choose_qparams(-1e-44, 1e-44, dtype, symmetric=symmetric).scale == 1.0


def test_choose_qparams_shapes_and_known_values() -> None:
    qp = choose_qparams(np.array([[-1.0], [0.0]]), np.array([[1.0], [2.0]]), np.int8)
    assert qp.scale.shape == (2, 1)
    np.testing.assert_array_equal(qp.scale, np.float32([[2 / 255], [2 / 255]]))
    np.testing.assert_array_equal(qp.zero_point, [[-1], [-128]])
    sym = choose_qparams(-3.0, 1.0, np.int8, symmetric=True)
    assert sym.scale == np.float32(3.0) / np.float32(127) and sym.zero_point == 0
    usym = choose_qparams(-3.0, 1.0, np.uint8, symmetric=True)
    assert usym.scale == np.float32(3.0) / np.float32(127) and usym.zero_point == 128
    assert choose_qparams(-1, 1, ml_dtypes.uint4, symmetric=True).zero_point == 8
    assert choose_qparams(-1, 1, np.uint16, symmetric=True).zero_point == 32768


@pytest.mark.parametrize("lo, hi", [(np.nan, 1.0), (0.0, np.inf), (-np.inf, 0.0), (2.0, 1.0)])
def test_choose_qparams_rejects_bad_ranges(lo, hi) -> None:
    with pytest.raises(QuantParamsError):
        choose_qparams(lo, hi, np.int8)


def test_choose_qparams_rejects_float_dtypes() -> None:
    with pytest.raises(QuantParamsError, match="integer"):
        choose_qparams(-1, 1, ml_dtypes.float8_e4m3fn)


@st.composite
def tensor_and_granularity(draw: st.DrawFn):
    rank = draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["tensor", "axis", "group", "block"]))
    if kind == "tensor":
        return tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank))), PerTensor()
    if kind == "axis":
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
        return shape, PerAxis(draw(st.integers(-rank, rank - 1)))
    if kind == "group":
        axis, g = draw(st.integers(-rank, rank - 1)), draw(st.integers(1, 4))
        shape = [draw(st.integers(1, 4)) for _ in range(rank)]
        shape[axis] = g * draw(st.integers(1, 3))
        return tuple(shape), PerGroup(axis, g)
    block = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    return tuple(b * draw(st.integers(1, 3)) for b in block), PerBlock(block)


@SETTINGS
@given(
    case=tensor_and_granularity(),
    dtype=st.sampled_from(DTYPES),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_choose_qparams_for_tensor_matches_naive_blocks(case, dtype, symmetric, seed) -> None:
    shape, granularity = case
    x = np.random.default_rng(seed).normal(0, 3, shape).astype(np.float32)
    qp = choose_qparams_for_tensor(x, dtype, granularity, symmetric=symmetric)
    block = block_size_for(granularity, shape)
    assert qp.scale.ndim == x.ndim and qp.block_size(shape) == block
    for idx in np.ndindex(*qp.scale.shape):
        region = x[tuple(slice(i * b, (i + 1) * b) for i, b in zip(idx, block, strict=True))]
        one = choose_qparams(region.min(), region.max(), dtype, symmetric=symmetric)
        assert qp.scale[idx] == one.scale and qp.zero_point[idx] == one.zero_point


def test_choose_qparams_for_tensor_errors() -> None:
    with pytest.raises(QuantParamsError, match=r"\(4, 6\)"):
        choose_qparams_for_tensor(np.zeros((4, 6)), np.int8, PerGroup(1, 4))
    with pytest.raises(QuantParamsError, match="NaN"):
        choose_qparams_for_tensor(np.array([1.0, np.nan]), np.int8)
    empty = choose_qparams_for_tensor(np.zeros((0, 3)), np.int8, PerAxis(1))
    assert empty.scale.shape == (1, 3) and np.all(empty.scale == 1)


def test_bias_qparams_scale_is_float32_product_per_output_channel() -> None:
    from qlinear.quant import bias_qparams

    x_scale = np.float32(0.0123)
    w_scale = np.array([0.5, 0.25, 0.003], np.float32)
    qp = bias_qparams(x_scale, w_scale, 3)
    np.testing.assert_array_equal(qp.scale, x_scale * w_scale)
    assert qp.dtype == np.int32 and not qp.zero_point.any()
    assert bias_qparams(x_scale, np.float32(0.5), 4).scale.shape == (4,)
    gemm = bias_qparams(x_scale, w_scale, 3, alpha=2.0)
    np.testing.assert_array_equal(gemm.scale, (x_scale * w_scale) * np.float32(2.0))
    with pytest.raises(QuantParamsError, match="does not match 4 output channels"):
        bias_qparams(x_scale, w_scale, 4)
    with pytest.raises(QuantParamsError, match="per-tensor input scale"):
        bias_qparams(w_scale, w_scale, 3)
