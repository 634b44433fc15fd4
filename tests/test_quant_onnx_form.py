"""from_onnx / to_onnx: the compact ONNX form <-> full-rank QuantParams, both ways."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from qlinear.errors import QuantParamsError
from qlinear.quant import QuantParams, from_onnx, to_onnx

DTYPES = [np.int8, np.uint8, np.int16, np.uint16, ml_dtypes.int4, ml_dtypes.uint4]
SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def compact_forms(draw: st.DrawFn):
    """A canonical compact ONNX form: (tensor shape, scale, zero point, attrs, dtype).

    Canonical = what to_onnx itself would emit: per-axis only for C > 1; blocked only
    when the scale is not per-tensor/per-axis in disguise."""
    rank = draw(st.integers(0, 4))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    info = ml_dtypes.iinfo(dtype)
    kind = draw(st.sampled_from(["tensor", "axis", "blocked"] if rank else ["tensor"]))
    if kind == "tensor":
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
        scale_shape, attrs = (), {}
    elif kind == "axis":
        shape = list(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
        axis = draw(st.integers(0, rank - 1))
        shape[axis] = draw(st.integers(2, 5))
        scale_shape, attrs = (shape[axis],), {"axis": axis}
        shape = tuple(shape)
    else:
        axis = draw(st.integers(0, rank - 1))
        block, nblocks = draw(st.integers(2, 4)), draw(st.integers(2, 3))
        shape = [draw(st.integers(1, 3)) for _ in range(rank)]
        shape[axis] = block * nblocks
        scale_shape = list(shape)
        scale_shape[axis] = nblocks
        shape, scale_shape = tuple(shape), tuple(scale_shape)
        attrs = {"axis": axis, "block_size": block}
    scale = rng.uniform(0.01, 2, scale_shape).astype(np.float32)
    zp = rng.integers(info.min, info.max + 1, scale_shape).astype(dtype)
    return shape, scale, zp, attrs, dtype


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and np.array_equal(a.astype(np.float64), b.astype(np.float64))
    )


@SETTINGS
@given(form=compact_forms(), use_rank=st.booleans(), negative_axis=st.booleans())
def test_compact_to_full_to_compact_is_exact(form, use_rank, negative_axis) -> None:
    shape, scale, zp, attrs, dtype = form
    kwargs = dict(attrs)
    if negative_axis and "axis" in kwargs:
        kwargs["axis"] -= len(shape)
    qp = from_onnx(scale, zp, len(shape) if use_rank else shape, **kwargs)
    assert qp.scale.ndim == len(shape) and qp.dtype == np.dtype(dtype)
    qp.validate(shape)
    s2, z2, attrs2 = to_onnx(qp, shape)
    assert _same(s2, scale) and _same(z2, zp) and attrs2 == attrs


@st.composite
def full_forms(draw: st.DrawFn):
    """Any QuantParams expressible in ONNX: at most one axis with real (>1, <dim) blocks."""
    rank = draw(st.integers(0, 4))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    info = ml_dtypes.iinfo(dtype)
    scale_shape = [draw(st.sampled_from([1, 2, 3])) for _ in range(rank)]
    block = [1 if s > 1 else draw(st.integers(1, 3)) for s in scale_shape]
    if rank and draw(st.booleans()):
        ax = draw(st.integers(0, rank - 1))
        block[ax] = draw(st.integers(2, 3))
        scale_shape[ax] = draw(st.integers(1, 3))
    shape = tuple(s * b for s, b in zip(scale_shape, block, strict=True))
    qp = QuantParams(
        rng.uniform(0.01, 2, scale_shape), rng.integers(info.min, info.max + 1, scale_shape), dtype
    )
    return shape, qp


@SETTINGS
@given(case=full_forms())
def test_full_to_compact_to_full_keeps_meaning(case) -> None:
    shape, qp = case
    scale, zp, attrs = to_onnx(qp, shape)
    assert scale.dtype == np.float32 and zp.dtype == qp.dtype and zp.shape == scale.shape
    # the most compact form: scalar, [C] or same-rank blocked
    assert scale.ndim == (0 if not attrs else 1 if "block_size" not in attrs else len(shape))
    back = from_onnx(scale, zp, shape, **attrs)
    for a, b in zip(back.expand(shape), qp.expand(shape), strict=True):
        assert np.array_equal(np.broadcast_to(a, shape), np.broadcast_to(b, shape))
    # numpy_helper round trip (what a saved model holds), int4 packing included
    z_saved = numpy_helper.to_array(numpy_helper.from_array(zp, "zp"))
    assert _same(z_saved, zp)
    # idempotent from here on
    again = to_onnx(back, shape)
    assert _same(again[0], scale) and _same(again[1], zp) and again[2] == attrs


def test_known_forms() -> None:
    qp = from_onnx(np.float32(0.5), np.uint8(3), (2, 3, 4))
    assert qp.scale.shape == (1, 1, 1) and qp.dtype == np.uint8
    qp = from_onnx(np.float32([0.5, 1, 2]), np.int8([1, 2, 3]), (2, 3, 4), axis=-2)
    assert qp.scale.shape == (1, 3, 1)
    qp = from_onnx(
        np.ones((2, 2), np.float32), None, (2, 6), axis=1, block_size=3, dtype=ml_dtypes.int4
    )
    assert qp.block_size((2, 6)) == (1, 3) and qp.dtype == np.dtype(ml_dtypes.int4)
    # no zero point and no dtype: ONNX's default uint8
    assert from_onnx(np.float32(1), None, 1).dtype == np.uint8
    # one element is per-tensor, whatever axis/block_size say (as onnx.reference)
    assert from_onnx(np.float32([2]), np.int8([1]), (5, 4), axis=1).scale.shape == (1, 1)
    # float16 scales are widened exactly
    assert from_onnx(np.float16(0.1), None, 1).scale == np.float32(np.float16(0.1))
    # the full shape is not needed for per-tensor / per-axis
    assert from_onnx(np.ones(7, np.float32), None, 3, axis=0).scale.shape == (7, 1, 1)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (
            (np.ones(3, np.float32), None, (2, 4)),
            {"axis": 1},
            r"per-axis scale shape \(3,\) does not match dim 1 of tensor shape \(2, 4\)",
        ),
        ((np.ones(3, np.float32), None, (2, 4)), {"axis": 2}, "axis 2 is out of range"),
        (
            (np.ones((2, 3), np.float32), None, (2, 4)),
            {},
            r"scale of shape \(2, 3\) .* must be a scalar, 1-D",
        ),
        (
            (np.ones((2, 3), np.float32), None, (2, 4)),
            {"axis": 1, "block_size": 2},
            r"blocked scale shape \(2, 3\) does not fit tensor shape \(2, 4\)",
        ),
        (
            (np.ones((2, 2), np.float32), None, (3, 4)),
            {"axis": 1, "block_size": 2},
            r"must equal tensor shape \(3, 4\) outside axis 1",
        ),
        (
            (np.ones((2, 2), np.float32), None, (2, 3)),
            {"axis": 1, "block_size": 2},
            "ragged last block",
        ),
        (
            (np.ones(2, np.float32), None, (2, 4)),
            {"axis": 1, "block_size": 2},
            "must have the rank",
        ),
        (
            (np.ones(2, np.float32), np.zeros(3, np.int8), (2, 4)),
            {"axis": 0},
            r"zero point shape \(3,\) does not match scale shape \(2,\)",
        ),
        ((np.float32(1), np.int8(0), (2, 4)), {"dtype": np.uint8}, "disagrees"),
        ((np.int32(1), None, (2, 4)), {}, "float"),
    ],
)
def test_from_onnx_errors_name_the_shapes(args, kwargs, match) -> None:
    with pytest.raises(QuantParamsError, match=match):
        from_onnx(*args, **kwargs)


def test_to_onnx_rejects_two_blocked_axes() -> None:
    qp = QuantParams(np.ones((2, 3)), None, np.int8)
    with pytest.raises(QuantParamsError, match=r"along axes \[0, 1\]"):
        to_onnx(qp, (4, 6))
    with pytest.raises(QuantParamsError, match="does not divide"):
        to_onnx(qp, (4, 7))


def test_to_onnx_spells_out_broadcast_dims() -> None:
    qp = QuantParams(np.float32([[1, 2]]), None, np.int8)  # (1, 2) on (3, 4): group 2 on axis 1
    scale, zp, attrs = to_onnx(qp, (3, 4))
    assert attrs == {"axis": 1, "block_size": 2}
    assert scale.tolist() == [[1, 2]] * 3 and zp.shape == (3, 2)
    elementwise = QuantParams(np.ones((3, 1, 4)), None, np.int8)  # broadcast along dim 1 only
    scale, _, attrs = to_onnx(elementwise, (3, 2, 4))
    assert attrs == {"axis": 0, "block_size": 1} and scale.shape == (3, 2, 4)
