"""Single-pass quantized elementwise kernels against the numpy definitions (atol=0)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qlinear.quant import QuantParams, dequantize_affine, quantize_affine
from qlinear.runtime.kernels import elementwise as ew
from qlinear.runtime.kernels import qelementwise as qk
from qlinear.runtime.ops.quantize import _fast_layout

INTS = [np.uint8, np.int8, np.uint16, np.int16]
SHAPES = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=7)


def _params(draw, dtype, shape, per_axis):
    info = np.iinfo(dtype)
    if per_axis:
        axis = draw(st.integers(0, len(shape) - 1))
        pshape = tuple(d if i == axis else 1 for i, d in enumerate(shape))
    else:
        pshape = (1,) * len(shape)
    n = int(np.prod(pshape))
    scale = draw(hnp.arrays(np.float32, n, elements=st.floats(
        0.0009765625, 16.0, width=32))).reshape(pshape)
    zp = draw(hnp.arrays(np.int64, n, elements=st.integers(int(info.min),
                                                           int(info.max)))).reshape(pshape)
    return QuantParams(scale, zp, dtype)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(INTS), per_axis=st.booleans(), shape=SHAPES)
def test_quantize_dequantize_bit_identical(data, dtype, per_axis, shape) -> None:
    qp = _params(data.draw, dtype, shape, per_axis)
    x = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(
        width=32, allow_nan=True, allow_infinity=True)))
    scale, zp, inner = _fast_layout(qp, shape)
    info = np.iinfo(dtype)
    got = qk.quantize_f32(x, scale, zp, inner, int(info.min), int(info.max), np.dtype(dtype))
    np.testing.assert_array_equal(got, quantize_affine(x, qp))
    q = quantize_affine(x, qp)
    want = dequantize_affine(q, qp)
    np.testing.assert_array_equal(qk.dequantize(q, scale, zp, inner), want)


def test_quantize_ties_and_saturation() -> None:
    qp = QuantParams(np.float32(0.5), np.int32(3), np.int8)
    x = np.array([0.25, 0.75, -0.25, 1e30, -1e30, np.nan, np.inf, -np.inf, 63.25, -65.25],
                 np.float32)
    got = qk.quantize_f32(x, qp.scale.reshape(1), qp.zero_point.reshape(1), x.size, -128,
                          127, np.dtype(np.int8))
    np.testing.assert_array_equal(got, quantize_affine(x, qp))


def _ref_add(a, b, r_a, r_b, fixed, dtype):
    info = np.iinfo(dtype)
    y = a.astype(np.float32) * r_a + (b.astype(np.float32) * r_b + fixed)
    return np.clip(np.rint(y), info.min, info.max).astype(dtype)


BROADCASTS = [((2, 3, 5, 8), (2, 3, 5, 8)), ((2, 3, 5, 8), ()), ((), (4, 6)),
              ((2, 3, 5, 8), (8,)), ((2, 3, 5, 8), (3, 1, 1)), ((4, 1), (1, 6)),
              ((3, 1, 5), (3, 4, 5)), ((1,), (1, 1))]


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("shapes", BROADCASTS)
def test_qlinear_add_mul_bit_identical(dtype, shapes) -> None:
    from qlinear.runtime.kernels.requant import output_multiplier

    rng = np.random.default_rng(1)
    info = np.iinfo(dtype)
    a = rng.integers(info.min, info.max + 1, shapes[0]).astype(dtype)
    b = rng.integers(info.min, info.max + 1, shapes[1]).astype(dtype)
    plan = qk.plan_binary(a.shape, b.shape)
    assert plan is not None
    r_a, r_b, fixed = np.float32(0.71), np.float32(0.43), np.float32(-37.3)
    got = qk.qlinear_add(a, b, plan, r_a, r_b, fixed, np.dtype(dtype))
    np.testing.assert_array_equal(got, _ref_add(a, b, r_a, r_b, fixed, dtype))
    za, zb, zc = int(info.min) + 120, int(info.min) + 130, int(info.min) + 128
    mult = output_multiplier(np.float32(0.05), np.float32(0.03), np.float32(0.5), 1)[0]
    got = qk.qlinear_mul(a, b, plan, za, zb, mult, zc, np.dtype(dtype))
    prod = (a.astype(np.int32) - za) * (b.astype(np.int32) - zb)
    v = np.clip(prod.astype(np.float32) * mult, np.float32(info.min - zc),
                np.float32(info.max - zc))
    want = (np.rint(v).astype(np.int32) + zc).astype(dtype)
    np.testing.assert_array_equal(got, want)


def test_collapse_rejects_incompatible_and_deep_broadcasts() -> None:
    assert qk.collapse_broadcast((3,), (4,)) is None
    assert qk.collapse_broadcast((2, 1, 2, 1), (1, 2, 1, 2)) is None
    assert qk.collapse_broadcast((1, 3, 1, 8), (2, 3, 5, 8)) is None


@pytest.mark.parametrize("channels_last", [False, True])
def test_global_average_pool_matches_int_sum(channels_last) -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (2, 5, 7, 3) if channels_last else (2, 3, 5, 7)).astype(np.uint8)
    axes = (1, 2) if channels_last else (2, 3)
    mult = np.float32(0.013)
    acc = x.astype(np.int32).sum(axis=axes, keepdims=True) - 100 * 35
    v = np.clip(acc.astype(np.float32) * mult, np.float32(-7), np.float32(248))
    want = (np.rint(v).astype(np.int32) + 7).astype(np.uint8)
    got = qk.qlinear_global_avg_pool(x, channels_last, 100, mult, 7)
    np.testing.assert_array_equal(got, want)


def test_softmax_rows_sum_to_one() -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (3, 4, 17)).astype(np.uint8)
    got = qk.qlinear_softmax_last(x, np.float32(0.05), np.float32(1 / 256), 0, np.dtype(np.uint8))
    xf = (x.astype(np.float64) - 128) * 0.05
    e = np.exp(xf - xf.max(-1, keepdims=True))
    want = np.clip(np.rint(e / e.sum(-1, keepdims=True) * 256), 0, 255)
    assert np.abs(got.astype(int) - want).max() <= 1


def test_erf_polynomial_is_correctly_rounded_float32() -> None:
    x = np.concatenate([np.linspace(-7, 7, 200001, dtype=np.float32),
                        np.float32([0.0, -0.0, 1e-30, -1e-38, 6.0, 5.999, np.inf, -np.inf])])
    want = np.array([math.erf(v) for v in x.astype(np.float64)])
    got = ew.erf(x)
    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-300)
    assert rel.max() < 1e-7  # the spec; in practice 2^-24 (one rounding)
    assert np.mean(got == want.astype(np.float32)) > 0.9999  # correctly rounded but ties
    assert np.signbit(got[200002]) and np.isnan(ew.erf(np.float32([np.nan]))).all()
