"""FuseQLinearPass: DQ->Conv/MatMul/Gemm->Q => QLinearConv/QLinearMatMul/QGemm."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from _qdq_graphs import G, ops, ort_run, run

from qlinear.passes import REPLACES_KEY, ExplainLog, optimize
from qlinear.passes.fuse_qlinear import FuseQLinearPass

RNG = np.random.default_rng(0)
DTYPES = [(np.uint8, 128), (np.int8, 0)]


def conv_model(dtype, zp, *, bias=True, relu=False, out_zp=None, weight_axis=0):
    g = G()
    x = g.qdq("x", 0.05, zp, dtype)
    w = RNG.normal(size=(8, 3, 3, 3)).astype(np.float32)
    inputs = [x, g.weight(w, axis=weight_axis)]
    if bias:
        inputs.append(g.const(RNG.normal(size=8).astype(np.float32), "b"))
    y = g.op("Conv", *inputs, pads=[1, 1, 1, 1])
    if relu:
        y = g.op("Relu", y)
    y = g.dq(g.q(y, 0.1, zp if out_zp is None else out_zp, dtype), 0.1,
             zp if out_zp is None else out_zp, dtype)
    return g.model({"x": (1, 3, 6, 6)}, [y])


FEED = {"x": RNG.normal(size=(1, 3, 6, 6)).astype(np.float32)}


@pytest.mark.parametrize("dtype,zp", DTYPES)
def test_conv_fuses_and_matches(dtype, zp):
    model = conv_model(dtype, zp)
    out = optimize(model)
    assert "QLinearConv" in ops(out) and "Conv" not in ops(out)
    fused = next(n for n in out.graph.node if n.op_type == "QLinearConv")
    assert any(p.key == REPLACES_KEY for p in fused.metadata_props)
    before, after = run(model, FEED)[0], run(out, FEED)[0]
    # int accumulation vs float: at most one quantization step (0.1) apart
    assert np.abs(before - after).max() <= 0.1 + 1e-6
    np.testing.assert_allclose(ort_run(out, FEED)[0], after, atol=1e-6)


def test_relu_absorbed_only_when_exact():
    absorbed = optimize(conv_model(np.uint8, 0, relu=True, out_zp=0))
    assert "Relu" not in ops(absorbed) and "QLinearConv" in ops(absorbed)
    kept = optimize(conv_model(np.uint8, 128, relu=True))
    assert "QLinearConv" not in ops(kept)


def test_weight_per_axis_on_wrong_axis_is_refused():
    log = ExplainLog()
    out = optimize(conv_model(np.uint8, 128, weight_axis=1), log=log)
    assert "QLinearConv" not in ops(out)
    assert any("output-channel axis" in line for line in log.lines())


def test_non_constant_weight_refused():
    g = G()
    x = g.qdq("x", 0.05, 128)
    w = g.qdq("w", 0.02, 128)
    y = g.qdq(g.op("Conv", x, w), 0.1, 128)
    out = optimize(g.model({"x": (1, 3, 6, 6), "w": (4, 3, 3, 3)}, [y]))
    assert "QLinearConv" not in ops(out)


def test_mismatched_dtypes_refused():
    g = G()
    x = g.qdq("x", 0.05, 0, np.int8)
    y = g.op("Conv", x, g.weight(RNG.normal(size=(4, 3, 1, 1)).astype(np.float32)))
    y = g.dq(g.q(y, 0.1, 128, np.uint8), 0.1, 128, np.uint8)
    out = optimize(g.model({"x": (1, 3, 6, 6)}, [y]))
    assert "QLinearConv" not in ops(out)


def test_output_with_float_consumer_not_fused():
    g = G()
    x = g.qdq("x", 0.05, 128)
    y = g.op("Conv", x, g.weight(RNG.normal(size=(4, 3, 1, 1)).astype(np.float32)))
    a = g.qdq(y, 0.1, 128)
    b = g.op("Sigmoid", y)
    out = optimize(g.model({"x": (1, 3, 6, 6)}, [a, b]))
    assert "QLinearConv" not in ops(out)
    before = run(g.model({"x": (1, 3, 6, 6)}, [a, b]), FEED)
    after = run(out, FEED)
    for x0, x1 in zip(before, after, strict=True):
        np.testing.assert_array_equal(x0, x1)


def test_shared_dq_with_float_consumer_keeps_dq():
    g = G()
    x = g.qdq("x", 0.05, 128)
    y = g.qdq(g.op("Conv", x, g.weight(RNG.normal(size=(4, 3, 1, 1)).astype(np.float32))),
              0.1, 128)
    z = g.op("Relu", x)
    model = g.model({"x": (1, 3, 6, 6)}, [y, z])
    out = optimize(model)
    assert "QLinearConv" in ops(out) and "DequantizeLinear" in ops(out)
    np.testing.assert_array_equal(run(model, FEED)[1], run(out, FEED)[1])


def test_q_with_two_consumers_all_fed():
    g = G()
    x = g.qdq("x", 0.05, 128)
    q = g.q(g.op("Conv", x, g.weight(RNG.normal(size=(4, 3, 1, 1)).astype(np.float32))),
            0.1, 128)
    a = g.dq(q, 0.1, 128)
    b = g.op("Identity", q)
    model = g.model({"x": (1, 3, 6, 6)}, [a, b])
    out = optimize(model)
    assert "QLinearConv" in ops(out)
    r0, r1 = run(model, FEED), run(out, FEED)
    assert np.abs(r0[1].astype(int) - r1[1].astype(int)).max() <= 1


@pytest.mark.parametrize("dtype,zp", DTYPES)
def test_matmul_and_gemm(dtype, zp):
    g = G()
    x = g.qdq("x", 0.05, zp, dtype)
    w = RNG.normal(size=(16, 8)).astype(np.float32)
    m = g.qdq(g.op("MatMul", x, g.weight(w, axis=1)), 0.2, zp, dtype)
    wt = RNG.normal(size=(4, 8)).astype(np.float32)
    y = g.op("Gemm", m, g.weight(wt, axis=0), g.const(RNG.normal(size=4).astype(np.float32)),
             transB=1)
    y = g.qdq(y, 0.2, zp, dtype)
    model = g.model({"x": (2, 16)}, [y])
    out = optimize(model)
    assert {"QLinearMatMul", "QGemm"} <= set(ops(out))
    assert not {"MatMul", "Gemm"} & set(ops(out))
    feed = {"x": RNG.normal(size=(2, 16)).astype(np.float32)}
    before, after = run(model, feed)[0], run(out, feed)[0]
    assert np.abs(before - after).max() <= 0.4 + 1e-6
    np.testing.assert_allclose(ort_run(out, feed)[0], after, atol=0.2 + 1e-6)


def test_matmul_b_per_axis_on_k_refused():
    g = G()
    x = g.qdq("x", 0.05, 128)
    w = RNG.normal(size=(16, 8)).astype(np.float32)
    m = g.qdq(g.op("MatMul", x, g.weight(w, axis=0)), 0.2, 128)
    out = optimize(g.model({"x": (2, 16)}, [m]))
    assert "QLinearMatMul" not in ops(out)


def test_pass_reports_and_is_idempotent():
    model = ir.from_proto(conv_model(np.uint8, 128))
    assert FuseQLinearPass()(model).modified
    once = optimize(conv_model(np.uint8, 128))
    twice = optimize(once)
    assert ops(once) == ops(twice)
