"""Plan-time step fusions: the graph stays standard ONNX, the session runs fewer passes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
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
