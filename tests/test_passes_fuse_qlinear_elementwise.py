"""FuseQLinearElementwisePass: DQ->Add/Mul/Concat/pool/Sigmoid/LeakyRelu/Softmax->Q."""

from __future__ import annotations

import numpy as np
import pytest
from _qdq_graphs import G, ops, ort_run, run

from qlinear.passes import optimize

RNG = np.random.default_rng(2)
FEED = {"x": RNG.normal(size=(1, 4, 6, 6)).astype(np.float32)}


def unit(op, dtype, zp, **attrs):
    g = G()
    x = g.qdq("x", 0.05, zp, dtype)
    if op in ("Add", "Mul"):
        other = g.qdq(g.op("Relu", "x"), 0.03, zp, dtype)
        y = g.op(op, x, other)
    elif op == "Concat":
        y = g.op(op, x, g.qdq(g.op("Relu", "x"), 0.03, zp, dtype), axis=1)
    else:
        y = g.op(op, x, **attrs)
    y = g.qdq(y, 0.02 if op != "Softmax" else 1 / 256, zp if op != "Softmax" else
              (0 if dtype == np.uint8 else -128), dtype)
    return g.model({"x": (1, 4, 6, 6)}, [y])


CASES = [
    ("Add", {}, "QLinearAdd"),
    ("Mul", {}, "QLinearMul"),
    ("Concat", {}, "QLinearConcat"),
    ("GlobalAveragePool", {}, "QLinearGlobalAveragePool"),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}, "QLinearAveragePool"),
    ("Sigmoid", {}, "QLinearSigmoid"),
    ("LeakyRelu", {"alpha": 0.1}, "QLinearLeakyRelu"),
    ("Softmax", {"axis": -1}, "QLinearSoftmax"),
]


@pytest.mark.parametrize("op,attrs,fused", CASES)
@pytest.mark.parametrize("dtype,zp", [(np.uint8, 128), (np.int8, 0)])
def test_fuses_and_matches(op, attrs, fused, dtype, zp):
    model = unit(op, dtype, zp, **attrs)
    out = optimize(model)
    assert fused in ops(out) and op not in ops(out)
    step = 1 / 256 if op == "Softmax" else 0.02
    before, after = run(model, FEED)[0], run(out, FEED)[0]
    assert np.abs(before - after).max() <= step + 1e-6  # at most one quantization step
    assert np.abs(ort_run(out, FEED)[0] - after).max() <= step + 1e-6


def test_per_axis_operand_refused():
    g = G()
    x = g.dq(g.op("QuantizeLinear", "x", g.const(np.full(4, 0.05, np.float32)),
                  g.const(np.full(4, 128, np.uint8)), axis=1),
             np.full(4, 0.05, np.float32), np.full(4, 128, np.uint8), axis=1)
    y = g.qdq(g.op("Sigmoid", x), 0.02, 128)
    out = optimize(g.model({"x": (1, 4, 6, 6)}, [y]))
    assert "QLinearSigmoid" not in ops(out)


def test_mixed_dtypes_refused():
    g = G()
    y = g.dq(g.q(g.op("Sigmoid", g.qdq("x", 0.05, 0, np.int8)), 0.02, 0, np.uint8), 0.02, 0)
    out = optimize(g.model({"x": (1, 4, 6, 6)}, [y]))
    assert "QLinearSigmoid" not in ops(out)


@pytest.mark.parametrize("dtype,qmin", [(np.uint8, 0), (np.int8, -128)])
def test_residual_add_relu_is_absorbed_when_the_output_range_clamps_at_zero(dtype, qmin):
    g = G()
    x = g.qdq("x", 0.05, qmin + 64, dtype)
    other = g.qdq(g.op("Relu", "x"), 0.03, qmin, dtype)
    y = g.qdq(g.op("Relu", g.op("Add", x, other)), 0.02, qmin, dtype)
    model = g.model({"x": (1, 4, 6, 6)}, [y])
    out = optimize(model)
    assert ops(out).count("QLinearAdd") == 1
    assert ops(out).count("Relu") == 1, "only the float Relu on the input is left"
    before, after = run(model, FEED)[0], run(out, FEED)[0]
    assert np.abs(before - after).max() <= 0.02 + 1e-6  # QLinearAdd rounds once: one step
    np.testing.assert_array_equal(ort_run(out, FEED)[0], after)
    fused = next(n for n in out.graph.node if n.op_type == "QLinearAdd")
    replaced = {p.key: p.value for p in fused.metadata_props}["qlinear.replaces"]
    relu = next(n for n in model.graph.node if n.op_type == "Relu" and n.input[0] != "x")
    assert replaced == relu.output[0], "the fused node stands for the Relu output it absorbed"


def test_add_relu_is_kept_when_the_output_zero_point_is_not_qmin():
    g = G()
    x = g.qdq("x", 0.05, 128, np.uint8)
    other = g.qdq(g.op("Relu", "x"), 0.03, 128, np.uint8)
    y = g.qdq(g.op("Relu", g.op("Add", x, other)), 0.02, 128, np.uint8)
    out = optimize(g.model({"x": (1, 4, 6, 6)}, [y]))
    assert "QLinearAdd" not in ops(out) and "Add" in ops(out)
