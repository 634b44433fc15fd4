"""Plan-time step fusions: the graph stays standard ONNX, the session runs fewer passes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qlinear

RNG = np.random.default_rng(5)


def _dq_ln_q(dtype, rows: int, cols: int, *, expose_dq: bool = False, bias: bool = True):
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    info = np.iinfo(dtype)
    rng = np.random.default_rng(cols)  # the same parameters for every variant
    inits = {
        "xs": np.float32(0.05), "xz": np.array((info.min + info.max) // 2 + 7, dtype),
        "g": rng.uniform(0.5, 1.5, cols).astype(np.float32),
        "b": rng.normal(size=cols).astype(np.float32),
        "ys": np.float32(0.03), "yz": np.array(info.min + 100, dtype),
    }
    ln_inputs = ["f", "g", "b"] if bias else ["f", "g"]
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["f"]),
        helper.make_node("LayerNormalization", ln_inputs, ["n"], axis=-1, epsilon=1e-5),
        helper.make_node("QuantizeLinear", ["n", "ys", "yz"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", et, [2, rows, cols])]
    if expose_dq:
        outputs.append(helper.make_tensor_value_info("f", TensorProto.FLOAT, [2, rows, cols]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", et, [2, rows, cols])], outputs,
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("cols,bias", [(768, True), (37, False)])
def test_dequantize_layernorm_quantize_runs_as_one_step_with_the_same_bits(dtype, cols, bias):
    info = np.iinfo(dtype)
    x = RNG.integers(info.min, info.max + 1, (2, 19, cols)).astype(dtype)
    fused = qlinear.Session(_dq_ln_q(dtype, 19, cols, bias=bias), optimize=False)
    assert [s.spec.op_type for s in fused._steps] == ["LayerNormalization"]
    separate = qlinear.Session(_dq_ln_q(dtype, 19, cols, expose_dq=True, bias=bias),
                               optimize=False)
    assert len(separate._steps) == 3  # an outside reader of DQ's output: no fusion
    (y,) = fused.run(None, {"x": x})
    np.testing.assert_array_equal(y, separate.run(None, {"x": x})[0])
    ref = ort.InferenceSession(_dq_ln_q(dtype, 19, cols, bias=bias).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(y.astype(np.int32) - ref.astype(np.int32)).max() <= 1


def test_a_fused_layernorm_still_checks_its_input():
    fused = qlinear.Session(_dq_ln_q(np.uint8, 4, 16), optimize=False)
    with pytest.raises(qlinear.errors.QlinearError, match="x"):
        fused.run(None, {"x": np.zeros((2, 4, 16), np.int8)})


# --------------------------------------------------------------------------- matmul + add

K, N = 40, 70  # neither a multiple of 4 / 16 / 64


def _matmul_add(dtype, x_shape=(2, 19, K), *, bias_shape=(N,), const_first=False,
                bias_input=False, expose_mm=False, reuse_mm=False, add_scale=(),
                w_per_column=True):
    """x -> QLinearMatMul(W) -> QLinearAdd(., bias) -> y, in ORT's contrib form, with the
    knobs the fusion must look at."""
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    info = np.iinfo(dtype)
    rng = np.random.default_rng(N)
    w_shape = (N,) if w_per_column else ()
    inits = {
        "xs": np.float32(0.03), "xz": np.array(info.min + 120, dtype),
        "w": rng.integers(-128, 128, (K, N)).astype(np.int8),
        "ws": rng.uniform(1e-3, 2e-2, w_shape).astype(np.float32),
        "wz": np.zeros(w_shape, np.int8),
        "ms": np.float32(0.04), "mz": np.array(info.min + 131, dtype),
        "bs": np.full(add_scale or (), 0.02, np.float32), "bz": np.array(info.min + 100, dtype),
        "ys": np.float32(0.05), "yz": np.array(info.min + 125, dtype),
    }
    bias = rng.integers(info.min, info.max + 1, bias_shape).astype(dtype)
    bias.reshape(-1)[:2] = (info.min, info.max)[: bias.size]
    if not bias_input:
        inits["bias"] = bias
    add_in = [["mm", "ms", "mz"], ["bias", "bs", "bz"]]
    if const_first:
        add_in.reverse()
    nodes = [
        helper.make_node("QLinearMatMul", ["x", "xs", "xz", "w", "ws", "wz", "ms", "mz"],
                         ["mm"]),
        helper.make_node("QLinearAdd", [*add_in[0], *add_in[1], "ys", "yz"], ["y"],
                         domain="com.microsoft"),
    ]
    inputs = [helper.make_tensor_value_info("x", et, list(x_shape))]
    if bias_input:
        inputs.append(helper.make_tensor_value_info("bias", et, list(bias_shape)))
    outputs = [helper.make_tensor_value_info("y", et, None)]
    if expose_mm:
        outputs.append(helper.make_tensor_value_info("mm", et, None))
    if reuse_mm:  # a second reader of the product
        nodes.append(helper.make_node("QLinearAdd", ["mm", "ms", "mz", "mm", "ms", "mz", "ys",
                                                     "yz"], ["y2"], domain="com.microsoft"))
        outputs.append(helper.make_tensor_value_info("y2", et, None))
    graph = helper.make_graph(
        nodes, "g", inputs, outputs,
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return model, bias


def _unfused(model, monkeypatch) -> qlinear.Session:
    from qlinear.runtime import step_fusion

    with monkeypatch.context() as patch:
        patch.setattr(step_fusion, "_matmul_adds", lambda steps, outputs: steps)
        return qlinear.Session(model, optimize=False)


def _feeds(model, dtype, x_shape, bias):
    info = np.iinfo(dtype)
    feeds = {"x": RNG.integers(info.min, info.max + 1, x_shape).astype(dtype)}
    if len(model.graph.input) > 1:
        feeds["bias"] = bias
    return feeds


@pytest.mark.parametrize("kernels", ["auto", "portable"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("x_shape,bias_shape,const_first,w_per_column", [
    ((2, 19, K), (N,), False, True),
    ((2, 19, K), (1, 1, N), True, True),
    ((19, K), (1, 1, N), False, False),  # the output gains a leading 1
    ((1, K), (), True, True),  # a scalar bias, one row
    ((K,), (N,), False, True),  # a vector times a matrix
])
def test_matmul_then_bias_add_runs_as_one_gemm_with_the_same_bits(
        kernels, dtype, x_shape, bias_shape, const_first, w_per_column, monkeypatch):
    monkeypatch.setenv("QLINEAR_KERNELS", kernels)
    model, bias = _matmul_add(dtype, x_shape, bias_shape=bias_shape, const_first=const_first,
                              w_per_column=w_per_column)
    fused = qlinear.Session(model, optimize=False)
    assert [s.spec.op_type for s in fused._steps] == ["QLinearMatMul"]
    separate = _unfused(model, monkeypatch)
    assert len(separate._steps) == 2
    feeds = _feeds(model, dtype, x_shape, bias)
    (y,) = fused.run(None, feeds)
    (want,) = separate.run(None, feeds)
    assert y.dtype == want.dtype and y.shape == want.shape
    np.testing.assert_array_equal(y, want)
    ref = ort.InferenceSession(model.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("knob", [
    dict(expose_mm=True),  # the product is a graph output
    dict(reuse_mm=True),  # another node reads the product
    dict(bias_shape=(19, N)),  # not one value per column
    dict(bias_shape=(N, 1), x_shape=(N, K)),  # one value per row
    dict(bias_input=True),  # not a constant
    dict(add_scale=(N,)),  # a per-channel add scale
])
def test_matmul_then_add_near_misses_stay_two_steps(knob, monkeypatch):
    x_shape = knob.get("x_shape", (19, K))
    model, bias = _matmul_add(np.uint8, **{"x_shape": x_shape, **knob})
    session = qlinear.Session(model, optimize=False)
    ops = [s.spec.op_type for s in session._steps]
    assert ops[:2] == ["QLinearMatMul", "QLinearAdd"]
    feeds = _feeds(model, np.uint8, x_shape, bias)
    got = session.run(None, feeds)
    for a, b in zip(got, _unfused(model, monkeypatch).run(None, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_value_a_fusion_dropped_can_still_be_fetched(monkeypatch):
    """Per-layer compare asks for intermediates: the session answers them from a plan
    without step fusions, and the fused plan keeps serving plain runs."""
    model, bias = _matmul_add(np.uint8, (19, K))
    fused = qlinear.Session(model, optimize=False)
    assert [s.spec.op_type for s in fused._steps] == ["QLinearMatMul"]
    feeds = _feeds(model, np.uint8, (19, K), bias)
    mm, y = fused.run(["mm", "y"], feeds)
    want_mm, want_y = _unfused(model, monkeypatch).run(["mm", "y"], feeds)
    np.testing.assert_array_equal(mm, want_mm)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(fused.run(None, feeds)[0], want_y)
    assert "mm" in fused.value_names


# ------------------------------------------------------- quantize + move channels last

NHWC = (0, 2, 3, 1)


def _quantize_to_last(dtype, scale=0.0186, zp=114, *, perm=NHWC, rank=4, scale_shape=(),
                      expose_q=False, reuse_q=False, x_type=TensorProto.FLOAT, opset=17):
    """x (float NCHW) -> QuantizeLinear -> q -> Transpose(perm) -> y: the start of every
    NHWC CNN, with the knobs the fusion must look at. Dims are symbolic."""
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    dims = ["N", "C", "H", "W", "D"][:rank]
    inits = [numpy_helper.from_array(np.full(scale_shape, scale, np.float32), "s"),
             numpy_helper.from_array(np.full(scale_shape, zp, dtype), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1),
             helper.make_node("Transpose", ["q"], ["y"], perm=list(perm))]
    outputs = [helper.make_tensor_value_info("y", et, None)]
    if expose_q:
        outputs.append(helper.make_tensor_value_info("q", et, None))
    if reuse_q:  # a second reader of the quantized NCHW tensor
        nodes.append(helper.make_node("Neg", ["q"], ["r"]) if dtype == np.int8 else
                     helper.make_node("Identity", ["q"], ["r"]))
        outputs.append(helper.make_tensor_value_info("r", et, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", x_type, dims)],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _ort(model, feeds):
    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feeds)


def _run_all_ways(model, x):
    """(fused session, its outputs, the unfused plan's outputs, onnxruntime's)."""
    fused = qlinear.Session(model, optimize=False)
    got = fused.run(None, {"x": x})
    want = qlinear.Session(model, optimize=False, _fuse_steps=False).run(None, {"x": x})
    return fused, got, want, _ort(model, {"x": x})


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([np.uint8, np.int8]),
       shape=st.tuples(st.integers(1, 3), st.integers(1, 17), st.integers(1, 40),
                       st.integers(1, 40)))
def test_quantize_then_channels_last_is_one_step_with_the_same_bits(data, dtype, shape):
    info = np.iinfo(dtype)
    # powers of two make exact ties (h + 0.5) * scale
    scale = data.draw(st.one_of(st.floats(2.0 ** -12, 16.0, width=32),
                                st.integers(-12, 4).map(lambda e: 2.0 ** e)), label="scale")
    zp = data.draw(st.integers(int(info.min), int(info.max)), label="zero point")
    # values from numpy (an array this big is too much for hypothesis to draw), spread
    # from well inside the range to far beyond both ends; then exact ties and specials
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    spread = data.draw(st.sampled_from([3.0, 60.0, 300.0, 1e4]), label="spread")
    x = (rng.normal(0, spread, shape) * scale).astype(np.float32)
    flat = x.reshape(-1)
    ties = rng.random(flat.size) < 0.2
    flat[ties] = rng.integers(-600, 600, int(ties.sum())) * 0.5 * scale
    specials = data.draw(st.lists(st.sampled_from(
        [np.nan, np.inf, -np.inf, 3e38, -3e38, 0.0, -0.0, 1e-40]), max_size=6), label="specials")
    flat[rng.integers(0, flat.size, len(specials))] = specials
    fused, (y,), (want,), (ref,) = _run_all_ways(_quantize_to_last(dtype, scale, zp), x)
    assert [s.spec.op_type for s in fused._steps] == ["QuantizeLinear"]
    assert y.dtype == dtype and y.shape == (shape[0], shape[2], shape[3], shape[1])
    assert y.flags.c_contiguous
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("channels", [1, 3, 4, 16, 17])
def test_quantize_then_channels_last_of_an_image(dtype, channels):
    """Image-sized inputs: many tasks (so both threads), every channel-count path, NaN
    (-> the lowest value, as onnxruntime) and ±inf."""
    info = np.iinfo(dtype)
    x = RNG.normal(0, 2.5, (2, channels, 224, 97)).astype(np.float32)
    x.reshape(-1)[:5] = (np.nan, np.inf, -np.inf, 1e30, -1e30)
    fused, (y,), (want,), (ref,) = _run_all_ways(
        _quantize_to_last(dtype, 0.0186, info.min + 114), x)
    assert [s.spec.op_type for s in fused._steps] == ["QuantizeLinear"]
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("rank", [3, 5])
def test_quantize_then_channels_last_of_other_ranks(rank):
    perm = (0, *range(2, rank), 1)
    shape = (2, 3, 33, 5, 4)[:rank]
    x = RNG.normal(0, 3, shape).astype(np.float32)
    fused, (y,), (want,), (ref,) = _run_all_ways(
        _quantize_to_last(np.int8, 0.05, -3, perm=perm, rank=rank), x)
    assert [s.spec.op_type for s in fused._steps] == ["QuantizeLinear"]
    assert y.shape == tuple(shape[p] for p in perm)
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("knob", [
    dict(expose_q=True),  # the quantized NCHW tensor is a graph output
    dict(reuse_q=True),  # another node reads it
    dict(perm=(0, 3, 1, 2)),  # not channels last
    dict(perm=(0, 1, 3, 2)),
    dict(scale_shape=(3,)),  # per-axis quantization
])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_quantize_then_transpose_near_misses_stay_two_steps(knob, dtype):
    model = _quantize_to_last(dtype, **knob)
    x = RNG.normal(0, 2, (2, 3, 9, 11)).astype(np.float32)
    session, got, want, ref = _run_all_ways(model, x)
    ops = [s.spec.op_type for s in session._steps]
    assert ops[:2] == ["QuantizeLinear", "Transpose"]
    for a, b, c in zip(got, want, ref, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_a_fused_quantize_of_another_input_type_runs_the_graph():
    """An int32 input (QuantizeLinear-13 allows it): the fused step runs the original two
    kernels."""
    model = _quantize_to_last(np.uint8, 0.5, 7, x_type=TensorProto.INT32, opset=13)
    x = RNG.integers(-200, 200, (1, 3, 5, 6)).astype(np.int32)
    fused = qlinear.Session(model, optimize=False)
    assert [s.spec.op_type for s in fused._steps] == ["QuantizeLinear"]
    (y,) = fused.run(None, {"x": x})
    (want,) = qlinear.Session(model, optimize=False, _fuse_steps=False).run(None, {"x": x})
    np.testing.assert_array_equal(y, want)
    assert y.shape == (1, 5, 6, 3)


def test_the_quantized_nchw_input_can_still_be_fetched():
    model = _quantize_to_last(np.uint8)
    x = RNG.normal(0, 2, (1, 3, 16, 12)).astype(np.float32)
    fused = qlinear.Session(model, optimize=False)
    assert [s.spec.op_type for s in fused._steps] == ["QuantizeLinear"]
    q, y = fused.run(["q", "y"], {"x": x})
    want_q, want_y = qlinear.Session(model, optimize=False, _fuse_steps=False).run(
        ["q", "y"], {"x": x})
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(fused.run(None, {"x": x})[0], want_y)
    assert "q" in fused.value_names
