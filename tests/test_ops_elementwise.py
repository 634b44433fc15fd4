"""Elementwise op kernels beyond ONNX's backend cases: dtypes, broadcasting, edge values.

ONNX Runtime is the independent oracle; kernels are called through the registry the
way a Session plans them (factory at plan time, kernel at run time).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

from qlinear.runtime.registry import NodeSpec, lookup

ORT_OPSET = 17


def kernel(op: str, n_inputs: int = 1, opset: int = ORT_OPSET, consts=None, **attrs):
    node = helper.make_node(op, [f"x{i}" for i in range(n_inputs)], ["y"], **attrs)
    factory = lookup("", op, opset)
    assert factory is not None, f"{op} not registered at opset {opset}"
    return factory(NodeSpec(proto=node, opset=opset, consts=consts or {}))


def run_ort(op: str, inputs: list[np.ndarray], opset: int = ORT_OPSET, out_type=None, **attrs):
    """Run one node in ONNX Runtime; the output type defaults to the first input's."""
    names = [f"x{i}" for i in range(len(inputs))]
    node = helper.make_node(op, names, ["y"], **attrs)
    elem = {n: helper.np_dtype_to_tensor_dtype(a.dtype) for n, a in zip(names, inputs, strict=True)}
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(n, elem[n], a.shape)
            for n, a in zip(names, inputs, strict=True)
        ],
        [helper.make_tensor_value_info("y", out_type or elem["x0"], None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, dict(zip(names, inputs, strict=True)))[0]


def assert_same(got: np.ndarray, want: np.ndarray, rtol: float = 1e-6, atol: float = 1e-7):
    assert isinstance(got, np.ndarray)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape
    if want.dtype.kind == "f":
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
    else:
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------- binary

BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Equal": np.equal}


@settings(max_examples=40)
@given(
    shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=4),
    op=st.sampled_from([*BINARY, "Div"]),
    dtype=st.sampled_from([np.float32, np.float16, np.int32, np.uint8, np.int64]),
    seed=st.integers(0, 2**16),
)
def test_binary_broadcasting_keeps_dtype(shapes, op, dtype, seed) -> None:
    rng = np.random.default_rng(seed)
    a_shape, b_shape = shapes.input_shapes
    a = np.asarray(rng.standard_normal(a_shape) * 20).astype(dtype)
    b = np.asarray(rng.standard_normal(b_shape) * 20).astype(dtype)
    if op == "Div":
        b[b == 0] = 3  # integer x/0 is undefined in ONNX
    got = kernel(op, 2)(a, b)
    assert isinstance(got, np.ndarray) and got.shape == shapes.result_shape
    if op == "Div":
        if np.dtype(dtype).kind in "iu":
            want = np.trunc(a.astype(np.float64) / b).astype(dtype)
        else:
            want = np.true_divide(a, b)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = BINARY[op](a, b)
    assert_same(got, np.asarray(want), rtol=1e-3)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64])
def test_integer_div_truncates_like_ort(dtype) -> None:
    a = np.array([-7, 7, -7, 7, -6, 6, 0, -1], dtype=dtype)
    b = np.array([2, 2, -2, -2, 3, -3, 5, 4], dtype=dtype)
    assert_same(kernel("Div", 2)(a, b), run_ort("Div", [a, b]))


@pytest.mark.parametrize(
    ("base", "exponent"),
    [
        (np.float32, np.float32),
        (np.float32, np.int64),
        (np.float32, np.int32),
        (np.int32, np.float32),
        (np.int64, np.int64),
        (np.float16, np.float16),
        (np.float64, np.float64),
    ],
)
def test_pow_result_has_base_dtype(base, exponent) -> None:
    a = np.array([[1, 2, 3], [0.5, 4, 1.5]]).astype(base)
    b = np.array([2, 3, 1]).astype(exponent)
    assert_same(kernel("Pow", 2)(a, b), run_ort("Pow", [a, b]), rtol=1e-3)


@pytest.mark.parametrize("e", [2.0, 0.5, 3.0])
def test_pow_constant_exponent_fast_paths(e) -> None:
    a = np.abs(np.random.default_rng(0).standard_normal((3, 5))).astype(np.float32)
    b = np.array(e, dtype=np.float32)
    got = kernel("Pow", 2, consts={1: b})(a, b)
    assert_same(got, run_ort("Pow", [a, b]), rtol=1e-6)


def test_legacy_broadcast_aligns_at_axis() -> None:
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    b = np.array([1, 2, 3], dtype=np.float32)
    got = kernel("Add", 2, opset=6, broadcast=1, axis=1)(a, b)
    np.testing.assert_array_equal(got, a + b[:, None])


def test_sum_broadcasts_and_does_not_touch_inputs() -> None:
    xs = [
        np.ones((3, 1), np.float32),
        np.arange(4, dtype=np.float32),
        np.full((3, 4), 2.0, np.float32),
    ]
    before = [x.copy() for x in xs]
    got = kernel("Sum", 3)(*xs)
    np.testing.assert_array_equal(got, xs[0] + xs[1] + xs[2])
    for x, b in zip(xs, before, strict=True):
        np.testing.assert_array_equal(x, b)


def test_zero_d_operands_give_arrays() -> None:
    a, b = np.array(2.0, np.float32), np.array(3.0, np.float32)
    for op in ("Add", "Div", "Pow", "Equal"):
        assert type(kernel(op, 2)(a, b)) is np.ndarray
    for op in ("Relu", "Sigmoid", "Sqrt", "Tanh", "Erf", "HardSwish"):
        out = kernel(op)(a)
        assert type(out) is np.ndarray and out.dtype == np.float32


# ----------------------------------------------------------------------------- unary

EDGE = np.array([-100, -20, -5, -1, -1e-4, 0, 1e-4, 1, 5, 20, 100], dtype=np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize(
    ("op", "attrs"),
    [
        ("Sigmoid", {}),
        ("Tanh", {}),
        ("Relu", {}),
        ("Erf", {}),
        ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}),
        ("HardSwish", {}),
        ("LeakyRelu", {}),
        ("LeakyRelu", {"alpha": 1.5}),
        ("LeakyRelu", {"alpha": -0.5}),
    ],
)
def test_unary_activations_match_ort(op, attrs, dtype) -> None:
    if dtype is not np.float32 and op in ("Erf", "HardSigmoid", "HardSwish", "LeakyRelu"):
        pytest.skip("ORT CPU has no kernel for this op and dtype")
    x = EDGE.astype(dtype)
    got = kernel(op, **attrs)(x)
    rtol = 2e-3 if dtype is np.float16 else 1e-6
    assert_same(got, run_ort(op, [x], **attrs), rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gelu(approximate, dtype) -> None:
    x = np.linspace(-8, 8, 101).astype(dtype)
    got = kernel("Gelu", opset=20, approximate=approximate)(x)
    xd = x.astype(np.float64)
    if approximate == "none":
        want = 0.5 * xd * (1 + np.array([math.erf(v / math.sqrt(2)) for v in xd]))
    else:
        want = 0.5 * xd * (1 + np.tanh(math.sqrt(2 / math.pi) * (xd + 0.044715 * xd**3)))
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=2e-3 if dtype is np.float16 else 1e-6, atol=1e-6)


def test_erf_is_accurate_to_float32_rounding() -> None:
    x = np.linspace(-5, 5, 20001, dtype=np.float32)
    want = np.array([math.erf(v) for v in x.astype(np.float64)])
    got = kernel("Erf")(x)
    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-30)
    assert rel.max() < 1e-7


@pytest.mark.parametrize("dtype", [np.float32, np.int8, np.int32, np.uint8])
@pytest.mark.parametrize("bounds", [(2, 9), (None, 9), (2, None), (9, 2), (None, None)])
def test_clip_optional_bounds_match_ort(dtype, bounds) -> None:
    x = np.arange(-3, 15).astype(dtype)
    lo, hi = (None if v is None else np.array(v, dtype=dtype) for v in bounds)
    inputs = [x, lo if lo is not None else None, hi]
    names = ["x0", "x1" if lo is not None else "", "x2" if hi is not None else ""]
    while names[-1] == "":
        names.pop()
        inputs.pop()
    node = helper.make_node("Clip", names, ["y"])
    for consts in ({}, {i: v for i, v in enumerate(inputs) if i and v is not None}):
        k = lookup("", "Clip", 13)(NodeSpec(proto=node, opset=13, consts=consts))
        got = k(*inputs)
        want = x
        if lo is not None:
            want = np.maximum(want, lo)
        if hi is not None:
            want = np.minimum(want, hi)
        assert_same(got, want.astype(dtype))


def test_clip_attribute_form_opset6() -> None:
    x = np.linspace(-2, 2, 9, dtype=np.float32)
    got = kernel("Clip", opset=6, min=-0.5, max=1.0)(x)
    assert_same(got, np.clip(x, -0.5, 1.0).astype(np.float32))


def test_where_and_equal_strings() -> None:
    a = np.array(["a", "b", "c"], dtype=object)
    b = np.array(["a"], dtype=object)
    np.testing.assert_array_equal(kernel("Equal", 2, opset=19)(a, b), [True, False, False])
    cond = np.array([[True], [False]])
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    y = np.array(-1, dtype=np.int64)
    got = kernel("Where", 3)(cond, x, y)
    assert_same(got, np.where(cond, x, y))


# ------------------------------------------------------------------------------ Cast

NUMERIC = [
    np.bool_,
    np.int8,
    np.uint8,
    np.int16,
    np.uint16,
    np.int32,
    np.uint32,
    np.int64,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
]


@pytest.mark.parametrize("src", NUMERIC)
def test_cast_between_numeric_types_matches_ort(src) -> None:
    # in-range, non-negative values: out-of-range float->int conversion is undefined
    x = np.array([0, 1, 2.75, 7.5, 100, 127], dtype=np.float64).astype(src)
    for dst in NUMERIC:
        to = helper.np_dtype_to_tensor_dtype(np.dtype(dst))
        got = kernel("Cast", opset=13, to=to)(x)
        assert_same(got, run_ort("Cast", [x], opset=13, out_type=to, to=to), rtol=1e-3)


def test_cast_opset1_string_target_and_same_type_is_free() -> None:
    x = np.array([1.5, -2.0], dtype=np.float32)
    assert_same(kernel("Cast", opset=1, to="INT32")(x), np.array([1, -2], dtype=np.int32))
    assert kernel("Cast", opset=13, to=TensorProto.FLOAT)(x) is x


def test_cast_float8_saturates_unless_told_not_to() -> None:
    import ml_dtypes

    x = np.array([1000.0, -1000.0, np.inf, np.nan, 1.0], dtype=np.float32)
    sat = kernel("Cast", opset=19, to=TensorProto.FLOAT8E4M3FN)(x)
    assert sat.dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(sat.astype(np.float32)[[0, 1, 2, 4]], [448, -448, 448, 1])
    assert np.isnan(sat.astype(np.float32)[3])
    raw = kernel("Cast", opset=19, to=TensorProto.FLOAT8E4M3FN, saturate=0)(x)
    assert np.isnan(raw.astype(np.float32)[:4]).all()  # e4m3fn has no inf: overflow is NaN


def test_cast_to_and_from_string() -> None:
    x = np.array([1.5, 2.0], dtype=np.float32)
    s = kernel("Cast", opset=13, to=TensorProto.STRING)(x)
    assert s.dtype == object
    back = kernel("Cast", opset=13, to=TensorProto.FLOAT)(s)
    assert_same(back, x)
