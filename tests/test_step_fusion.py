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
