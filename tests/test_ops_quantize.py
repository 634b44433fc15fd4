"""Runtime QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear kernels.

Called through the registry factory, compared bit-exactly with onnx.reference and
onnxruntime. ORT cannot hand int4/uint4 tensors across its Python API, so the ORT
models keep scale/zero point (and DQ inputs) as initializers and end in a
DequantizeLinear with scale 1 to read the integer values as floats exactly.
"""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.helper import np_dtype_to_tensor_dtype
from onnx.reference import ReferenceEvaluator

from qlinear.errors import QuantParamsError, UnsupportedOpError
from qlinear.runtime.registry import NodeSpec, lookup

DTYPES = [np.int8, np.uint8, np.int16, np.uint16, ml_dtypes.int4, ml_dtypes.uint4]
SETTINGS = settings(max_examples=120, deadline=None)
OPSETS = [10, 13, 19, 21, 23, 25]


def kernel(op: str, opset: int, attrs: dict, n_inputs: int, consts: dict | None = None):
    names = ["x", "s", "z"][:n_inputs] if op != "DynamicQuantizeLinear" else ["x"]
    outs = ["y", "ys", "yz"] if op == "DynamicQuantizeLinear" else ["y"]
    node = helper.make_node(op, names, outs, **attrs)
    factory = lookup("", op, opset)
    assert factory is not None
    return factory(NodeSpec(proto=node, opset=opset, consts=consts or {}))


def run_reference(op: str, inputs: list[np.ndarray], attrs: dict, opset: int) -> np.ndarray:
    names = ["x", "s", "z"][: len(inputs)]
    graph = helper.make_graph(
        [helper.make_node(op, names, ["y"], **attrs)],
        "g",
        [
            helper.make_tensor_value_info(n, np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in zip(names, inputs, strict=True)
        ],
        [helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, dict(zip(names, inputs, strict=True)))[0]


def _ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def run_ort_q(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, attrs: dict) -> np.ndarray:
    """ORT QuantizeLinear (opset 21), integer result read back through DQ(scale=1)."""
    inits = [
        numpy_helper.from_array(scale, "s"),
        numpy_helper.from_array(zp, "z"),
        numpy_helper.from_array(np.array(1, np.float32), "one"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
            helper.make_node("DequantizeLinear", ["q", "one"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", np_dtype_to_tensor_dtype(x.dtype), x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return _ort_session(model).run(None, {"x": x})[0]


def run_ort_dq(xq: np.ndarray, scale: np.ndarray, zp: np.ndarray, attrs: dict) -> np.ndarray:
    inits = [
        numpy_helper.from_array(xq, "xq"),
        numpy_helper.from_array(scale, "s"),
        numpy_helper.from_array(zp, "z"),
    ]
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["y"], **attrs)],
        "g",
        [],
        [helper.make_tensor_value_info("y", np_dtype_to_tensor_dtype(scale.dtype), None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return _ort_session(model).run(None, {})[0]


def assert_identical(got: np.ndarray, want: np.ndarray) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (
        got.dtype,
        want.dtype,
        got.shape,
        want.shape,
    )
    # float64 holds every value of these dtypes exactly; signbit tells -0 from 0
    g64, w64 = got.astype(np.float64), want.astype(np.float64)
    assert np.array_equal(g64, w64, equal_nan=True), (got, want)
    assert np.array_equal(np.signbit(g64), np.signbit(w64)), (got, want)


# -- ONNX's own conformance cases --------------------------------------------------------


def _backend_cases():
    """ONNX's node cases for these three ops only: importing their case modules registers
    them (collect_testcases() would generate all ~1900 cases, ~10 s)."""
    import importlib

    from onnx.backend.test.case import node as node_cases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in ("quantizelinear", "dequantizelinear", "dynamicquantizelinear"):
            importlib.import_module(f"onnx.backend.test.case.node.{module}")
    ops = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
    return [
        c
        for c in node_cases._NodeTestCases
        if c.model is not None
        and len(c.model.graph.node) == 1
        and c.model.graph.node[0].op_type in ops
    ]


@pytest.mark.parametrize("case", _backend_cases(), ids=lambda c: c.name)
def test_onnx_backend_cases(case) -> None:
    """Includes float8 / float4e2m1 / int2 cases, which the ops also run."""
    node = case.model.graph.node[0]
    opset = case.model.opset_import[0].version
    run = lookup("", node.op_type, opset)(NodeSpec(proto=node, opset=opset, consts={}))

    def arr(v):
        return numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else np.asarray(v)

    for inputs, expected in case.data_sets:
        got = run(*[arr(v) for v in inputs])
        got = got if isinstance(got, tuple) else (got,)
        for g, w in zip(got, expected, strict=True):
            assert_identical(g, arr(w))


# -- properties vs onnx.reference --------------------------------------------------------


@st.composite
def onnx_layouts(draw: st.DrawFn, opset: int):
    """(x shape, scale shape, attrs) in ONNX's compact form, as allowed at `opset`,
    including ragged last blocks (D % block_size != 0) and negative axes."""
    rank = draw(st.integers(0 if opset < 13 else 1, 4))
    kinds = ["scalar", "one"] + (["axis"] if opset >= 13 and rank else [])
    kinds += ["blocked"] if opset >= 21 and rank else []
    kind = draw(st.sampled_from(kinds))
    shape = [draw(st.integers(1, 5)) for _ in range(rank)]
    if kind == "scalar":
        return tuple(shape), (), {}
    if kind == "one":
        return tuple(shape), (1,), {}
    axis = draw(st.integers(-rank, rank - 1))
    attrs = {"axis": axis}
    if kind == "axis":
        return tuple(shape), (shape[axis],), attrs
    block = draw(st.integers(1, 4))
    shape[axis] = draw(st.integers(1, 9))
    scale_shape = list(shape)
    scale_shape[axis] = -(-shape[axis] // block)
    return tuple(shape), tuple(scale_shape), {**attrs, "block_size": block}


@st.composite
def q_cases(draw: st.DrawFn, opsets=tuple(OPSETS), dtypes=tuple(DTYPES)):
    opset = draw(st.sampled_from(opsets))
    dtype = draw(st.sampled_from(dtypes if opset >= 21 else (np.int8, np.uint8)))
    shape, scale_shape, attrs = draw(onnx_layouts(opset))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    info = ml_dtypes.iinfo(dtype)
    if draw(st.booleans()):
        scale = np.ldexp(np.float32(1), rng.integers(-12, 4, scale_shape)).astype(np.float32)
    else:
        scale = np.exp(rng.uniform(-10, 3, scale_shape)).astype(np.float32)
    zp = rng.integers(info.min, info.max + 1, scale_shape)
    zp = np.where(rng.random(scale_shape) < 0.3, info.max, zp).astype(dtype)
    with_zp = draw(st.booleans()) or opset < 21
    return opset, dtype, shape, scale, zp if with_zp else None, attrs, rng


def broadcast_compact(scale: np.ndarray, shape: tuple, attrs: dict) -> np.ndarray:
    """The compact ONNX scale made broadcastable to `shape` (ragged blocks cropped)."""
    if scale.size == 1:
        return scale.reshape(())
    axis = attrs["axis"] % len(shape)
    if attrs.get("block_size"):
        full = np.repeat(scale, attrs["block_size"], axis=axis)
        return full.take(np.arange(shape[axis]), axis=axis)
    return scale.reshape([-1 if i == axis else 1 for i in range(len(shape))])


@SETTINGS
@given(case=q_cases(), const=st.booleans())
def test_quantize_kernel_matches_reference(case, const) -> None:
    opset, dtype, shape, scale, zp, attrs, rng = case
    span = float(ml_dtypes.iinfo(dtype).max - ml_dtypes.iinfo(dtype).min)
    units = rng.uniform(-1.5 * span, 1.5 * span, shape)
    units = np.where(rng.random(shape) < 0.3, np.round(units) + 0.5, units)
    x = (units * broadcast_compact(scale, shape, attrs)).astype(np.float32)
    if zp is None:
        attrs = {**attrs, "output_dtype": np_dtype_to_tensor_dtype(np.dtype(dtype))}
    inputs = [x, scale] + ([zp] if zp is not None else [])
    consts = {1: scale, **({2: zp} if zp is not None else {})} if const else {}
    run = kernel("QuantizeLinear", opset, attrs, len(inputs), consts)
    want = run_reference("QuantizeLinear", inputs, attrs, opset)
    assert_identical(run(*inputs), want)
    assert_identical(run(*inputs), want)  # a second call (cached plan) agrees


@SETTINGS
@given(
    case=q_cases(),
    const=st.sampled_from(["none", "params", "all"]),
    scale_dtype=st.sampled_from([np.float32, np.float16]),
)
def test_dequantize_kernel_matches_reference(case, const, scale_dtype) -> None:
    opset, dtype, shape, scale, zp, attrs, rng = case
    info = ml_dtypes.iinfo(dtype)
    xq = rng.integers(info.min, info.max + 1, shape).astype(dtype)
    scale = scale.astype(scale_dtype)
    if zp is None:
        zp = np.zeros(scale.shape, dtype) if opset < 19 else None
    inputs = [xq, scale] + ([zp] if zp is not None else [])
    consts = {}
    if const != "none":
        consts = {1: scale, **({2: zp} if zp is not None else {})}
    if const == "all":
        consts[0] = xq
    run = kernel("DequantizeLinear", opset, attrs, len(inputs), consts)
    # onnx.reference starts DequantizeLinear at opset 19 (10 and 13 are subsets of it)
    want = run_reference("DequantizeLinear", inputs, attrs, max(opset, 19))
    with np.errstate(over="ignore"):  # float16 scales: large products overflow in both
        assert_identical(run(*inputs), want)


@pytest.mark.parametrize("out", [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16])
def test_dequantize_output_dtype_attr(out) -> None:
    xq = np.arange(-8, 8, dtype=np.int8).reshape(4, 4)
    scale, zp = np.float32([0.1, 0.2, 0.3, 0.4]), np.int8([0, 1, -1, 3])
    attrs = {"axis": 0, "output_dtype": out}
    want = run_reference("DequantizeLinear", [xq, scale, zp], attrs, 23)
    assert_identical(kernel("DequantizeLinear", 23, attrs, 3)(xq, scale, zp), want)


def test_dequantize_int32_bias() -> None:
    """int32 DQ (biases quantized with x_scale * w_scale, zero point 0) as onnx.reference."""
    rng = np.random.default_rng(5)
    bias = rng.integers(-(2**31), 2**31 - 1, (4, 8)).astype(np.int32)
    scale = rng.uniform(1e-6, 1e-3, 8).astype(np.float32)
    for inputs in ([bias, scale], [bias, scale, np.zeros(8, np.int32)]):
        want = run_reference("DequantizeLinear", inputs, {"axis": 1}, 21)
        got = kernel("DequantizeLinear", 21, {"axis": 1}, len(inputs))(*inputs)
        assert_identical(got, want)


# -- vs onnxruntime ----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(case=q_cases(opsets=(21,)))
def test_quantize_and_dequantize_match_onnxruntime(case) -> None:
    _, dtype, shape, scale, zp, attrs, rng = case
    # ORT refuses a one-element scale with block_size (onnx.reference reads it as
    # per-tensor, and so do we); that combination is checked against the reference only.
    assume(not (attrs.get("block_size") and scale.size == 1))
    info = ml_dtypes.iinfo(dtype)
    zp = zp if zp is not None else np.zeros(scale.shape, dtype)
    x = (rng.standard_normal(shape) * 4 * scale.max() * (info.max - info.min)).astype(np.float32)
    x = np.where(rng.random(shape) < 0.2, np.round(x), x).astype(np.float32)
    got = kernel("QuantizeLinear", 21, attrs, 3)(x, scale, zp)
    assert_identical(got.astype(np.float32), run_ort_q(x, scale, zp, attrs))
    xq = rng.integers(info.min, info.max + 1, shape).astype(dtype)
    got = kernel("DequantizeLinear", 21, attrs, 3)(xq, scale, zp)
    assert_identical(got, run_ort_dq(xq, scale, zp, attrs))


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_and_huge_saturate_like_onnxruntime(dtype) -> None:
    """onnx.reference casts these to int32 (undefined); ORT and qlinear saturate,
    NaN -> qmin."""
    x = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 3e9, -3e9, 2.5, -0.5], np.float32)
    scale, zp = np.array(1.0, np.float32), np.array(1, dtype)
    got = kernel("QuantizeLinear", 21, {}, 3)(x, scale, zp)
    assert_identical(got.astype(np.float32), run_ort_q(x, scale, zp, {}))


def test_float16_input_matches_onnxruntime() -> None:
    """float16 x and scale: we (and ORT) divide in float32; onnx.reference divides in
    float16, so the two can differ at rounding boundaries."""
    rng = np.random.default_rng(3)
    x = rng.normal(0, 30, 256).astype(np.float16)
    scale, zp = np.array(0.37, np.float16), np.array(-3, np.int8)
    got = kernel("QuantizeLinear", 21, {}, 3)(x, scale, zp)
    assert_identical(got.astype(np.float32), run_ort_q(x, scale, zp, {}))


# -- DynamicQuantizeLinear ---------------------------------------------------------------


def _dynamic_reference_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "ys", "yz"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [
            helper.make_tensor_value_info("y", TensorProto.UINT8, None),
            helper.make_tensor_value_info("ys", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("yz", TensorProto.UINT8, None),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


_DYNAMIC_REF = ReferenceEvaluator(_dynamic_reference_model())
_DYNAMIC_ORT = _ort_session(_dynamic_reference_model())


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["mixed", "pos", "neg", "tiny"]),
    size=st.integers(1, 40),
)
def test_dynamic_quantize_matches_reference_and_onnxruntime(seed, kind, size) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 10 ** rng.uniform(-3, 4), size).astype(np.float32)
    x = {"pos": np.abs(x), "neg": -np.abs(x), "tiny": x * 1e-30, "mixed": x}[kind]
    got = kernel("DynamicQuantizeLinear", 11, {}, 1)(x)
    for want in (_DYNAMIC_REF.run(None, {"x": x}), _DYNAMIC_ORT.run(None, {"x": x})):
        for g, w in zip(got, want, strict=True):
            assert_identical(g, w)


def test_dynamic_quantize_edge_inputs() -> None:
    run = kernel("DynamicQuantizeLinear", 11, {}, 1)
    zeros = np.zeros((2, 3), np.float32)
    y, s, z = run(zeros)
    ort_out = _DYNAMIC_ORT.run(None, {"x": zeros})
    assert_identical(s, ort_out[1])  # 1.0 as ORT (onnx.reference says 1/255)
    assert_identical(y, ort_out[0]) and assert_identical(z, ort_out[2])
    empty = np.zeros((0, 3), np.float32)
    y, s, z = run(empty)
    assert y.shape == (0, 3) and y.dtype == np.uint8 and s == 1.0 and z == 0
    nan = np.array([np.nan, 1.0, -1.0], np.float32)  # NaN ignored for the range (as ORT)
    for g, w in zip(run(nan), _DYNAMIC_ORT.run(None, {"x": nan}), strict=True):
        assert_identical(g, w)
    with pytest.raises(QuantParamsError, match="Inf"):
        run(np.array([np.inf, 1.0], np.float32))


# -- planning and errors -----------------------------------------------------------------


def test_constant_dequantize_is_folded_at_plan_time() -> None:
    xq, scale, zp = np.int8([1, 2, 3]), np.float32(0.5), np.int8(1)
    run = kernel("DequantizeLinear", 21, {}, 3, {0: xq, 1: scale, 2: zp})
    out = run(xq, scale, zp)
    assert out.tolist() == [0.0, 0.5, 1.0] and not out.flags.writeable
    assert run(xq, scale, zp) is out


@pytest.mark.parametrize(
    "op, attrs, inputs, error, match",
    [
        (
            "QuantizeLinear",
            {"output_dtype": TensorProto.INT8},
            [np.zeros(3, np.float32), np.float32(1), np.uint8(0)],
            QuantParamsError,
            "disagrees",
        ),
        (
            "QuantizeLinear",
            {"axis": 0},
            [np.zeros(4, np.float32), np.ones(3, np.float32), np.zeros(3, np.uint8)],
            QuantParamsError,
            r"\(3,\) does not match dim 0 of tensor shape \(4,\)",
        ),
        (
            "DequantizeLinear",
            {},
            [np.zeros(3, np.int8), np.float32(1), np.uint8(0)],
            QuantParamsError,
            "differs",
        ),
        (
            "DequantizeLinear",
            {"axis": 1, "block_size": 2},
            [np.zeros((2, 4), np.int8), np.ones((2, 3), np.float32), np.zeros((2, 3), np.int8)],
            QuantParamsError,
            r"blocked scale shape \(2, 3\) does not fit tensor shape",
        ),
    ],
)
def test_errors_name_the_node_and_shapes(op, attrs, inputs, error, match) -> None:
    node = helper.make_node(op, ["x", "s", "z"][: len(inputs)], ["y"], name="q1", **attrs)
    run = lookup("", op, 21)(NodeSpec(proto=node, opset=21, consts={}))
    with pytest.raises(error, match=match) as info:
        run(*[np.asarray(a) for a in inputs])
    assert "q1" in str(info.value)


def test_unsupported_precision_is_refused_at_plan_time() -> None:
    node = helper.make_node("QuantizeLinear", ["x", "s"], ["y"], precision=TensorProto.FLOAT16)
    with pytest.raises(UnsupportedOpError, match="precision"):
        lookup("", "QuantizeLinear", 25)(NodeSpec(proto=node, opset=25, consts={}))


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    dtype=st.sampled_from([np.int8, np.uint8, np.int16, np.uint16]),
    per_axis=st.booleans(),
    const=st.booleans(),
)
def test_fast_path_is_quantize_affine(data, dtype, per_axis, const) -> None:
    """The single-pass runtime kernels equal qlinear.quant's definition bit for bit."""
    from hypothesis.extra import numpy as hnp

    from qlinear.quant import QuantParams, dequantize_affine, quantize_affine

    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6))
    axis = data.draw(st.integers(0, len(shape) - 1)) if per_axis else 1
    n = shape[axis] if per_axis else 1
    info = np.iinfo(dtype)
    scale = data.draw(hnp.arrays(np.float32, n, elements=st.floats(0.0009765625, 64.0, width=32)))
    zp = data.draw(hnp.arrays(dtype, n, elements=st.integers(int(info.min), int(info.max))))
    if not per_axis:
        scale, zp = scale.reshape(()), zp.reshape(())
    x = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(width=32)))
    attrs = {"axis": axis} if per_axis else {}
    consts = {1: scale, 2: zp} if const else None
    q_op = kernel("QuantizeLinear", 19, attrs, 3, consts)
    dq_op = kernel("DequantizeLinear", 19, attrs, 3, consts)
    pshape = tuple(d if i == axis else 1 for i, d in enumerate(shape)) if per_axis else ()
    qp = QuantParams(scale.reshape(pshape), zp.astype(np.int32).reshape(pshape), dtype)
    want_q = quantize_affine(x, qp)
    for _ in range(2):  # second call: the cached per-shape plan
        got_q = q_op(x, scale, zp)
        assert got_q.dtype == want_q.dtype
        np.testing.assert_array_equal(got_q, want_q)
        np.testing.assert_array_equal(dq_op(want_q, scale, zp), dequantize_affine(want_q, qp))
