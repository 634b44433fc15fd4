"""NHWC layout pass: every converted graph equals its NCHW form, in qlinear and in ORT.

Graphs are built in float, quantized with onnxruntime (static QDQ or dynamic) and
optimized with ``layout="nchw"`` and ``layout="nhwc"``; integer paths must agree
exactly. Each test also checks the pass invariant (`check_layout`), idempotence and
the number of transposes left.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from qlinear import Session
from qlinear.passes import ExplainLog, optimize
from qlinear.passes.layout import LayoutPass
from qlinear.passes.layout_analysis import (
    LayoutInvariantError,
    check_layout,
    layout_errors,
)

RNG = np.random.default_rng(5)
MS = "com.microsoft"


class F:
    """A float graph under construction (random weights, fresh names)."""

    def __init__(self, c: int = 3, hw: tuple[int, int] = (10, 12), batch: int = 2) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0
        self.input_shape = (batch, c, *hw)

    def _name(self, base: str) -> str:
        self.n += 1
        return f"{base}{self.n}"

    def const(self, arr) -> str:
        name = self._name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1,
             group: int = 1) -> str:
        w = RNG.normal(0, 1 / np.sqrt(k * k * cin / group), (cout, cin // group, k, k))
        b = RNG.normal(0, 0.1, cout)
        return self.op("Conv", x, self.const(w.astype(np.float32)),
                       self.const(b.astype(np.float32)), kernel_shape=[k, k],
                       pads=[k // 2] * 4, strides=[stride, stride], group=group)

    def per_channel(self, c: int, lo: float = 0.5, hi: float = 1.5) -> str:
        return self.const(RNG.uniform(lo, hi, (1, c, 1, 1)).astype(np.float32))

    def model(self, outputs: list[str], opset: int = 17) -> onnx.ModelProto:
        ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, self.input_shape)]
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
        graph = helper.make_graph(self.nodes, "g", ins, outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        return onnx.shape_inference.infer_shapes(model)


def _feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)}


def _static(model: onnx.ModelProto, tmp: Path, act=QuantType.QUInt8,
            calibration: list | None = None) -> onnx.ModelProto:
    fp, out = tmp / "f.onnx", tmp / "q.onnx"
    onnx.save(model, fp)
    batches = iter(calibration or [_feeds(model, s) for s in range(3)])

    class Reader(CalibrationDataReader):
        def get_next(self):  # noqa: ANN201 - ORT's interface
            return next(batches, None)

    quantize_static(str(fp), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=act, weight_type=QuantType.QInt8)
    return onnx.load(out)


def _dynamic(model: onnx.ModelProto, tmp: Path) -> onnx.ModelProto:
    fp, out = tmp / "f.onnx", tmp / "d.onnx"
    onnx.save(model, fp)
    quantize_dynamic(str(fp), str(out))
    return onnx.load(out)


def _run(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    return Session(model, optimize=False).run(None, feeds)


def _ort(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def transposes(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "Transpose" for n in model.graph.node)


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter((n.domain or "", n.op_type) for n in model.graph.node)


def _converted(qmodel: onnx.ModelProto, **kw) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(NCHW-optimized, NHWC-optimized) with the invariant and idempotence checked."""
    nchw = optimize(qmodel, layout="nchw", **kw)
    nhwc = optimize(qmodel, layout="nhwc", **kw)
    ir_model = ir.from_proto(nhwc)
    check_layout(ir_model.graph, ir_model.opset_imports[""])
    again = LayoutPass(custom_ops=kw.get("custom_ops", False))(ir_model)
    assert not again.modified, "a second layout run changed the graph"
    assert optimize(nhwc, layout="nhwc", **kw).graph == nhwc.graph
    return nchw, nhwc


def _assert_equal(nchw, nhwc, feeds, *, ort_too: bool = True, atol: float = 0.0) -> None:
    ref = _run(nchw, feeds)
    got = _run(nhwc, feeds)
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=atol)
    if ort_too:
        for r, g in zip(_ort(nchw, feeds), _ort(nhwc, feeds), strict=True):
            np.testing.assert_allclose(g, r, rtol=0, atol=atol)


# -- the failure mode: per-channel binary op first, dynamic quantization ----------------------


def _binary_first_chain() -> onnx.ModelProto:
    """x -> Mul(x, c[1,C,1,1]) -> Conv -> Relu -> Add(c') -> Conv -> Mul(c'') -> out."""
    f = F(c=4, hw=(9, 11))
    y = f.op("Mul", "x", f.per_channel(4))
    y = f.op("Relu", f.conv(y, 4, 8))
    y = f.op("Add", y, f.per_channel(8, -0.5, 0.5))
    y = f.conv(y, 8, 8)
    return f.model([f.op("Mul", y, f.per_channel(8))])


def test_binary_op_first_dynamic_quantization_converts_and_matches(tmp_path):
    dyn = _dynamic(_binary_first_chain(), tmp_path)
    assert "ConvInteger" in {n.op_type for n in dyn.graph.node}
    nchw, nhwc = _converted(dyn, custom_ops=True)
    assert _ops(nhwc)[("ai.qlinear", "ConvInteger")] == 2
    assert _ops(nhwc)[("", "ConvInteger")] == 0
    feeds = _feeds(dyn)
    ref, got = _run(nchw, feeds), _run(nhwc, feeds)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[0], _ort(dyn, feeds)[0], rtol=1e-5, atol=1e-5)
    # input transpose after DynamicQuantizeLinear (uint8), one back to NCHW at the end
    assert transposes(nhwc) == 2
    # the per-channel Add between the convolutions runs NHWC on a permuted constant
    g = ir.from_proto(nhwc).graph
    adds = [n for n in g if n.op_type == "Add"]
    assert any(n.inputs[1].shape is not None and list(n.inputs[1].shape)[-1] == 8 for n in adds)


def test_dynamic_without_custom_ops_is_left_for_onnxruntime(tmp_path):
    dyn = _dynamic(_binary_first_chain(), tmp_path)
    nchw, nhwc = _converted(dyn)
    assert transposes(nhwc) == 0 and _ops(nhwc) == _ops(nchw)
    _assert_equal(nchw, nhwc, _feeds(dyn))


def test_float_graph_unchanged_numerically(tmp_path):
    model = _binary_first_chain()
    nchw, nhwc = _converted(model)
    assert transposes(nhwc) == 0  # onnxruntime's CPU provider has no float NhwcConv
    _assert_equal(nchw, nhwc, _feeds(model), atol=1e-5)


# -- static QDQ graphs ----------------------------------------------------------------------------


def _shared_nhwc_and_nchw_consumer() -> onnx.ModelProto:
    """A shared activation read by a convolution (NHWC) and DepthToSpace (NCHW only)."""
    f = F(c=3)
    a = f.op("Relu", f.conv("x", 3, 8))
    b = f.conv(a, 8, 8)
    d = f.op("DepthToSpace", a, blocksize=2)
    e = f.op("Add", a, f.per_channel(8))  # a broadcasting consumer of the same value
    return f.model([b, d, e])


def _residual() -> onnx.ModelProto:
    f = F(c=3)
    a = f.op("Relu", f.conv("x", 3, 8))
    b = f.op("Relu", f.op("Add", f.conv(f.op("Relu", f.conv(a, 8, 8)), 8, 8), a))
    c = f.op("Mul", f.op("Add", f.conv(b, 8, 8), b), f.per_channel(8))
    c = f.op("Add", c, f.per_channel(8, -0.2, 0.2))
    return f.model([f.conv(c, 8, 4)])


def _concat() -> onnx.ModelProto:
    f = F(c=3)
    a = f.op("Relu", f.conv("x", 3, 8))
    cat = f.op("Concat", f.conv(a, 8, 4), f.conv(a, 8, 6, k=1), a, axis=1)
    return f.model([f.conv(cat, 18, 5, stride=2)])


def _softmax() -> onnx.ModelProto:
    f = F(c=3)
    s = f.op("Softmax", f.conv("x", 3, 6), axis=1)
    return f.model([f.conv(s, 6, 4)])


def _global_pool_head() -> onnx.ModelProto:
    f = F(c=3)
    a = f.op("MaxPool", f.op("Relu", f.conv("x", 3, 8, stride=2)), kernel_shape=[2, 2],
             strides=[2, 2])
    a = f.op("Relu", f.conv(a, 8, 8, group=8))  # depthwise
    p = f.op("Flatten", f.op("GlobalAveragePool", a), axis=1)
    w = f.const(RNG.normal(0, 0.3, (8, 5)).astype(np.float32))
    return f.model([f.op("Gemm", p, w, f.const(np.zeros(5, np.float32)))])


def _resize() -> onnx.ModelProto:
    f = F(c=3, hw=(6, 7))
    r = f.op("Resize", f.conv("x", 3, 4), "", f.const(np.array([1, 1, 2, 2], np.float32)),
             mode="nearest")
    return f.model([f.conv(r, 4, 4)])


def _reduce() -> onnx.ModelProto:
    """Reductions over channels (keepdims, axes attribute) and space (axes input, flat)."""
    f = F(c=3)
    a = f.op("Relu", f.conv("x", 3, 6))
    m = f.op("ReduceMean", a, axes=[1], keepdims=1)
    b = f.conv(f.op("Mul", a, m), 6, 4)
    s = f.op("ReduceSum", f.conv(b, 4, 4), f.const(np.array([2, 3], np.int64)), keepdims=0)
    w = f.const(RNG.normal(0, 0.3, (4, 3)).astype(np.float32))
    return f.model([f.op("MatMul", s, w)])


CASES = {
    # name: (builder, transposes left in the NHWC model)
    "shared_nhwc_and_nchw": (_shared_nhwc_and_nchw_consumer, 3),
    "residual": (_residual, 2),
    "concat_channels": (_concat, 2),
    "softmax_channels": (_softmax, 2),
    "global_pool_flat_head": (_global_pool_head, 1),
    "resize": (_resize, 2),
    "reduce_axes": (_reduce, 1),
}


@pytest.mark.parametrize("act", [QuantType.QUInt8, QuantType.QInt8], ids=["u8", "s8"])
@pytest.mark.parametrize("name", list(CASES))
def test_static_graph_nhwc_equals_nchw(name, act, tmp_path):
    build, n_transposes = CASES[name]
    qdq = _static(build(), tmp_path, act)
    nchw, nhwc = _converted(qdq)
    counts = _ops(nhwc)
    assert counts[(MS, "QLinearConv")] == _ops(nchw)[("", "QLinearConv")] > 0
    assert transposes(nhwc) == n_transposes, f"{name}: {transposes(nhwc)} transposes"
    _assert_equal(nchw, nhwc, _feeds(qdq))
    # and the NHWC model computes what the QDQ model does in onnxruntime
    feeds = _feeds(qdq)
    for a, b in zip(_ort(nhwc, feeds), _ort(nchw, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def test_shared_value_is_transposed_once(tmp_path):
    nhwc = optimize(_static(_shared_nhwc_and_nchw_consumer(), tmp_path), layout="nhwc")
    g = ir.from_proto(nhwc).graph
    sources = [n.inputs[0] for n in g if n.op_type == "Transpose"]
    assert len(sources) == len(set(sources)), "a value was transposed twice"


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2"])
def test_zoo_models_nhwc_match(name, tmp_path):
    from qlinear import zoo
    from qlinear.passes import fold_float

    fp = fold_float(zoo.build(name, "small"))
    qdq = _static(fp, tmp_path, calibration=list(zoo.calibration_batches(name, fp, n=2)))
    nchw, nhwc = _converted(qdq)
    assert _ops(nhwc)[("", "QLinearConv")] == 0 and transposes(nhwc) == 1
    # the input transpose runs on the quantized (1-byte) input, right after QuantizeLinear
    t = next(n for n in ir.from_proto(nhwc).graph if n.op_type == "Transpose")
    assert t.inputs[0].producer().op_type == "QuantizeLinear"
    feeds = zoo.example_inputs(name, qdq, batch=2)
    ref, got = _run(nchw, feeds), _run(nhwc, feeds)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(_ort(nhwc, feeds)[0], got[0])
    # Session's own optimize (default layout) gives the same result
    np.testing.assert_array_equal(Session(qdq).run(None, feeds)[0], ref[0])


# -- the invariant ---------------------------------------------------------------------------------


def _broken(const_shape) -> ir.Model:
    """NHWC QLinearConv output -> DQ -> Add(const) -> out, const as given."""
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 5, 6, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [
        numpy_helper.from_array(np.float32(0.1), "s"),
        numpy_helper.from_array(np.uint8(128), "z"),
        numpy_helper.from_array(RNG.integers(-5, 5, (4, 3, 1, 1)).astype(np.int8), "w"),
        numpy_helper.from_array(np.int8(0), "wz"),
        numpy_helper.from_array(np.ones(const_shape, np.float32), "c"),
    ]
    nodes = [
        helper.make_node("QLinearConv", ["x", "s", "z", "w", "s", "wz", "s", "z"], ["q"],
                         domain=MS, channels_last=1, name="conv"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dq"),
        helper.make_node("Add", ["d", "c"], ["y"], name="bias_add"),
    ]
    shapes = [helper.make_tensor_value_info("q", TensorProto.UINT8, [1, 5, 6, 4]),
              helper.make_tensor_value_info("d", TensorProto.FLOAT, [1, 5, 6, 4])]
    graph = helper.make_graph(nodes, "g", [x], [y], inits, value_info=shapes)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(MS, 1)])
    return ir.from_proto(onnx.shape_inference.infer_shapes(model))


def test_invariant_names_node_with_unpermuted_constant():
    bad = _broken((1, 4, 1, 1))
    errors = layout_errors(bad.graph, 17)
    assert len(errors) == 1 and "'bias_add'" in errors[0]
    with pytest.raises(LayoutInvariantError, match="bias_add"):
        check_layout(bad.graph, 17)
    check_layout(_broken((1, 1, 1, 4)).graph, 17)  # permuted: fine


def test_invariant_names_node_with_mixed_operands():
    model = _broken((1, 1, 1, 4))
    g = model.graph
    add = next(n for n in g if n.op_type == "Add")
    nchw = ir.node("Transpose", [add.inputs[0]], {"perm": [0, 3, 1, 2]})
    g.insert_before(add, nchw)
    nchw.outputs[0].shape = ir.Shape([1, 4, 5, 6])
    add.replace_input_with(1, nchw.outputs[0])  # an NCHW value next to an NHWC one
    with pytest.raises(LayoutInvariantError, match="bias_add.*different formats"):
        check_layout(g, 17)


def test_isolated_convolution_stays_nchw(tmp_path):
    f = F(c=3)
    qdq = _static(f.model([f.conv("x", 3, 4)]), tmp_path)
    log = ExplainLog()
    nhwc = optimize(qdq, layout="nhwc", log=log)
    assert transposes(nhwc) == 0 and _ops(nhwc)[("", "QLinearConv")] == 1
    assert any("isolated" in line for line in log.lines())


def test_explain_names_converted_and_refused(tmp_path):
    log = ExplainLog()
    optimize(_static(_shared_nhwc_and_nchw_consumer(), tmp_path), layout="nhwc", log=log)
    lines = log.lines()
    assert any("QLinearConv; LayoutPass: channels-last" in line for line in lines), lines


def test_unknown_layout_rejected():
    with pytest.raises(ValueError, match="layout"):
        optimize(_binary_first_chain(), layout="nchwc")
