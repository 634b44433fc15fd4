"""QuantParams: validation, derived granularity/channel axis, block sizes, expand, dtype table."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from qlinear.errors import QuantParamsError
from qlinear.quant import (
    PerAxis,
    PerBlock,
    PerGroup,
    PerTensor,
    QuantParams,
    block_size_for,
    from_onnx_type,
    qrange,
    quant_dtype,
    scale_shape_for,
    to_onnx_type,
)

SETTINGS = settings(max_examples=150, deadline=None)


# -- dtype table -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, onnx_type, lo, hi",
    [
        (np.int8, TensorProto.INT8, -128, 127),
        (np.uint8, TensorProto.UINT8, 0, 255),
        (np.int16, TensorProto.INT16, -32768, 32767),
        (np.uint16, TensorProto.UINT16, 0, 65535),
        (ml_dtypes.int4, TensorProto.INT4, -8, 7),
        (ml_dtypes.uint4, TensorProto.UINT4, 0, 15),
        (ml_dtypes.int2, TensorProto.INT2, -2, 1),
        (ml_dtypes.uint2, TensorProto.UINT2, 0, 3),
        (np.int32, TensorProto.INT32, -(2**31), 2**31 - 1),
    ],
)
def test_dtype_table(dtype, onnx_type, lo, hi) -> None:
    assert qrange(dtype) == (lo, hi)
    assert to_onnx_type(dtype) == onnx_type
    assert from_onnx_type(onnx_type) == np.dtype(dtype)
    # agrees with onnx's own mapping (what numpy_helper.to_array returns)
    assert np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type)) == np.dtype(dtype)
    assert quant_dtype(onnx_type) is quant_dtype(np.dtype(dtype)) is quant_dtype(dtype)


def test_dtype_table_rejects_non_quantized() -> None:
    for bad in (np.float32, "float32", TensorProto.FLOAT, np.int64):
        with pytest.raises(QuantParamsError):
            quant_dtype(bad)
    assert quant_dtype("int4").np_dtype == np.dtype(ml_dtypes.int4)


# -- construction and validation ---------------------------------------------------------


def test_normalises_and_freezes() -> None:
    qp = QuantParams([0.5, 0.25], [1, 2], np.int8)
    assert qp.scale.dtype == np.float32 and qp.zero_point.dtype == np.int32
    assert qp.dtype == np.dtype(np.int8) and (qp.qmin, qp.qmax) == (-128, 127)
    with pytest.raises(ValueError):
        qp.scale[0] = 1.0
    with pytest.raises(AttributeError):
        qp.scale = np.ones(2)  # type: ignore[misc]


def test_copies_its_inputs() -> None:
    scale = np.array([0.5, 0.25], np.float32)
    qp = QuantParams(scale, None, np.uint8)
    scale[0] = 9
    assert qp.scale[0] == 0.5 and qp.zero_point.tolist() == [0, 0]


def test_zero_point_from_quantized_dtypes_and_broadcast() -> None:
    qp = QuantParams(np.ones((2, 3), np.float32), np.array(-8, ml_dtypes.int4), ml_dtypes.int4)
    assert qp.zero_point.shape == (2, 3) and np.all(qp.zero_point == -8)
    qp = QuantParams([1.0], np.array([5], np.uint16), np.uint16)
    assert qp.zero_point.tolist() == [5]


@pytest.mark.parametrize(
    "scale, zp, dtype, match",
    [
        ([1.0, 2.0], [1, 2, 3], np.int8, r"zero point shape \(3,\) does not match scale shape"),
        (1.0, 128, np.int8, r"outside \[-128, 127\]"),
        (1.0, -1, np.uint8, "outside"),
        (1.0, 8, ml_dtypes.int4, "outside"),
        (1.0, 0.5, np.int8, "integral"),
        (np.nan, 0, np.int8, "finite"),
        (np.inf, 0, np.int8, "finite"),
        (-1.0, 0, np.int8, ">= 0"),
        (1.0, 0, np.float32, "not a quantized dtype"),
        (1.0, 1, ml_dtypes.float8_e4m3fn, "no zero point"),
    ],
)
def test_rejects_bad_parameters(scale, zp, dtype, match) -> None:
    with pytest.raises(QuantParamsError, match=match):
        QuantParams(scale, zp, dtype)


def test_value_equality_and_hash() -> None:
    a = QuantParams([0.5, 0.25], [1, 2], np.int8)
    b = QuantParams(np.array([0.5, 0.25], np.float64), np.array([1, 2], np.int8), "int8")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != QuantParams([0.5, 0.25], [1, 2], np.uint8)
    assert a != QuantParams([[0.5, 0.25]], [[1, 2]], np.int8)
    assert a != QuantParams([0.5, 0.25], [1, 3], np.int8)
    assert "int8" in repr(a)


# -- derived layout ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "scale_shape, axis",
    [
        ((), 0),
        ((1,), 0),
        ((1, 1, 1, 1), 0),
        ((8,), 0),
        ((8, 1, 1, 1), 0),
        ((1, 16), 1),
        ((1, 1, 1, 3), 3),
        ((4, 16), None),
        ((2, 1, 3), None),
    ],
)
def test_channel_axis_table(scale_shape, axis) -> None:
    assert QuantParams(np.ones(scale_shape), None, np.int8).channel_axis() == axis


@pytest.mark.parametrize(
    "tensor_shape, scale_shape, block, granularity",
    [
        ((4, 6), (), (4, 6), PerTensor()),
        ((4, 6), (1, 1), (4, 6), PerTensor()),
        ((4, 6), (4, 1), (1, 6), PerAxis(0)),
        ((4, 6), (1, 6), (4, 1), PerAxis(1)),
        ((1, 6), (1, 6), (1, 1), PerAxis(1)),
        ((4, 6), (4, 3), (1, 2), PerGroup(1, 2)),
        ((8, 6), (2, 6), (4, 1), PerGroup(0, 4)),
        ((1, 6), (1, 2), (1, 3), PerGroup(1, 3)),
        ((4, 6), (1, 3), (4, 2), PerBlock((4, 2))),
        ((4, 6), (2, 3), (2, 2), PerBlock((2, 2))),
        ((4, 6), (4, 6), (1, 1), PerBlock((1, 1))),
        ((2, 3, 4), (2, 3, 1), (1, 1, 4), PerGroup(2, 4)),
        ((2, 3, 4), (1, 3, 2), (2, 1, 2), PerBlock((2, 1, 2))),
    ],
)
def test_block_size_and_granularity_table(tensor_shape, scale_shape, block, granularity) -> None:
    qp = QuantParams(np.ones(scale_shape), None, np.int8)
    assert qp.block_size(tensor_shape) == block
    assert qp.granularity(tensor_shape) == granularity
    assert block_size_for(granularity, tensor_shape) == block


@pytest.mark.parametrize(
    "tensor_shape, scale_shape, match",
    [
        ((4, 6), (3, 1), r"scale shape \(3, 1\) does not divide tensor shape \(4, 6\)"),
        ((4, 6), (1, 4), r"\(4, 6\).*dim 1"),
        ((4, 6), (4,), r"scale shape \(4,\) must be a singleton or have the rank"),
        ((4, 6), (1, 1, 6), "rank"),
        ((0, 6), (0, 6), None),
        ((4, 6), (0, 6), "empty dim"),
    ],
)
def test_non_dividing_shapes_raise(tensor_shape, scale_shape, match) -> None:
    qp = QuantParams(np.ones(scale_shape), None, np.int8)
    if match is None:
        assert qp.block_size(tensor_shape) == (1, 1)
        return
    with pytest.raises(QuantParamsError, match=match):
        qp.block_size(tensor_shape)
    with pytest.raises(QuantParamsError):
        qp.granularity(tensor_shape)


@st.composite
def scale_and_block(draw: st.DrawFn):
    rank = draw(st.integers(0, 4))
    scale_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    block = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    return scale_shape, block


@SETTINGS
@given(case=scale_and_block(), seed=st.integers(0, 2**32 - 1))
def test_expand_and_granularity_are_consistent(case, seed) -> None:
    scale_shape, block = case
    shape = tuple(s * b for s, b in zip(scale_shape, block, strict=True))
    rng = np.random.default_rng(seed)
    qp = QuantParams(
        rng.uniform(0.1, 2, scale_shape), rng.integers(-128, 128, scale_shape), np.int8
    )
    # the block size and the granularity derived from it agree
    derived = qp.block_size(shape)
    assert derived == block or qp.scale.size == 1
    assert block_size_for(qp.granularity(shape), shape) == derived
    assert scale_shape_for(qp.granularity(shape), shape) == (
        (1,) * len(shape) if qp.scale.size == 1 else scale_shape
    )
    # expand == naive element -> block lookup
    scale, zp = qp.expand(shape)
    full_s = np.broadcast_to(scale, shape)
    full_z = np.broadcast_to(zp, shape)
    for idx in np.ndindex(*shape):
        src = () if qp.scale.size == 1 else tuple(i // b for i, b in zip(idx, derived, strict=True))
        assert full_s[idx] == qp.scale.reshape(qp.scale.shape if src else ())[src]
        assert full_z[idx] == qp.zero_point.reshape(qp.scale.shape if src else ())[src]
    # only truly blocked axes are materialised
    assert all(e in (1, d) for e, d in zip(np.shape(scale), shape, strict=False))


def test_expand_per_tensor_is_0d_whatever_the_scale_rank() -> None:
    qp = QuantParams(np.ones((1, 1, 1)), None, np.int8)
    scale, zp = qp.expand((5,))
    assert scale.shape == () and zp.shape == ()


# -- granularity helpers -----------------------------------------------------------------


def test_granularity_helpers() -> None:
    assert scale_shape_for(PerAxis(-1), (2, 3, 4)) == (1, 1, 4)
    assert scale_shape_for(PerGroup(-2, 2), (2, 4, 5)) == (2, 2, 5)
    assert scale_shape_for(PerTensor(), (0, 3)) == (1, 1)
    with pytest.raises(QuantParamsError, match="out of range"):
        block_size_for(PerAxis(2), (2, 3))
    with pytest.raises(QuantParamsError, match="positive"):
        block_size_for(PerGroup(0, 0), (2, 3))
    with pytest.raises(QuantParamsError, match="one positive entry per dim"):
        block_size_for(PerBlock((1,)), (2, 3))
    with pytest.raises(QuantParamsError, match=r"does not divide tensor shape \(2, 5\)"):
        scale_shape_for(PerGroup(1, 2), (2, 5))
