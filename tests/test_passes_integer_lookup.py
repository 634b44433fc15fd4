"""FuseIntegerLookupPass: 8-bit elementwise chains of one tensor become one table lookup."""

from __future__ import annotations

import numpy as np
import pytest
from _qdq_graphs import G, ops, ort_run, run

from qlinear.passes import optimize
from qlinear.passes.pipeline import quantized_passes

RNG = np.random.default_rng(11)
SHAPE = (2, 8, 48)
FEED = {"x": (RNG.normal(size=SHAPE) * 2).astype(np.float32)}


def _quantized_gelu(dtype, zp, *, outside_reader: bool = False, second_input: bool = False):
    """GELU as a QDQ tool writes it: its Add and both Muls quantized in between
    (so after the QLinear fusions: lookup -> QLinearAdd -> QLinearMul -> QLinearMul)."""
    g = G()
    x = g.qdq("x", 0.03, zp, dtype)
    t = g.op("Erf", g.op("Div", x, g.const(np.array(1.4142135, np.float32))))
    t = g.qdq(t, 0.008, zp, dtype)
    t = g.qdq(g.op("Add", t, _quantized_scalar(g, 1.0, dtype)), 0.009, zp, dtype)
    other = g.qdq("y", 0.03, zp, dtype) if second_input else x
    t2 = g.qdq(g.op("Mul", other, t), 0.05, zp, dtype)
    y = g.op("Mul", t2, _quantized_scalar(g, 0.5, dtype))
    outputs = [g.qdq(y, 0.02, zp, dtype)]
    if outside_reader:
        outputs.append(g.op("Relu", t2))
    inputs = {"x": SHAPE, "y": SHAPE} if second_input else {"x": SHAPE}
    return g.model(inputs, outputs)


def _quantized_scalar(g: G, value: float, dtype) -> str:
    """A constant operand as QDQ tools store it: an 8-bit code and its DequantizeLinear."""
    top = np.iinfo(dtype).max
    return g.dq(g.const(np.array(top, dtype)), np.float32(value / top), 0, dtype)


def _without_integer_lookup(model):
    """The same optimization with every pass but this one (the unfused reference)."""
    from qlinear.passes import pipeline

    original = pipeline.quantized_passes
    pipeline.quantized_passes = lambda log=None: [
        p for p in original(log) if type(p).__name__ != "FuseIntegerLookupPass"
    ]
    try:
        return optimize(model, layout="nchw")
    finally:
        pipeline.quantized_passes = original


def test_the_pass_runs_after_the_float_table_lookups():
    names = [type(p).__name__ for p in quantized_passes()]
    assert names.index("FuseIntegerLookupPass") > names.index("FuseTableLookupPass")


@pytest.mark.parametrize(
    "dtype,zp", [(np.uint8, 128), (np.uint8, 3), (np.int8, 0), (np.int8, -100)]
)
def test_quantized_gelu_becomes_one_lookup_equal_to_the_unfused_graph(dtype, zp):
    model = _quantized_gelu(dtype, zp)
    ref = _without_integer_lookup(model)
    assert ops(ref).count("QLinearMul") == 2 and "QLinearAdd" in ops(ref)
    out = optimize(model, layout="nchw")
    assert "QLinearMul" not in ops(out) and "QLinearAdd" not in ops(out)
    assert ops(out).count("Gather") == 1
    np.testing.assert_array_equal(run(out, FEED)[0], run(ref, FEED)[0])
    np.testing.assert_array_equal(ort_run(out, FEED)[0], run(out, FEED)[0])


def test_an_intermediate_read_outside_stays_computed():
    model = _quantized_gelu(np.uint8, 128, outside_reader=True)
    out = optimize(model, layout="nchw")
    ref = _without_integer_lookup(model)
    # x * t is read by the Relu, so it stays; the tail after it (* 0.5) alone is one pass
    assert "QLinearMul" in ops(out)
    for a, b in zip(run(out, FEED), run(ref, FEED), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_product_of_two_different_tensors_is_not_a_lookup():
    model = _quantized_gelu(np.uint8, 128, second_input=True)
    feeds = dict(FEED, y=(RNG.normal(size=SHAPE)).astype(np.float32))
    out = optimize(model, layout="nchw")
    assert "QLinearMul" in ops(out)
    np.testing.assert_array_equal(run(out, feeds)[0], run(_without_integer_lookup(model), feeds)[0])


def test_a_per_channel_operand_ends_the_unit():
    g = G()
    x = g.qdq("x", 0.03, 128)
    per_channel = g.dq(g.const(RNG.integers(0, 256, SHAPE[-1]).astype(np.uint8)), 0.01, 128)
    bias = g.op("Add", x, per_channel)
    t = g.qdq(g.op("Mul", g.qdq(bias, 0.04, 128), _quantized_scalar(g, 0.7, np.uint8)), 0.03, 128)
    y = g.op("Add", t, _quantized_scalar(g, 0.25, np.uint8))
    model = g.model({"x": SHAPE}, [g.qdq(y, 0.03, 128)])
    out = optimize(model, layout="nchw")
    # the per-channel Add stays; the two scalar ops after it become one lookup
    assert ops(out).count("QLinearAdd") == 1 and "QLinearMul" not in ops(out)
    assert "Gather" in ops(out)
    np.testing.assert_array_equal(run(out, FEED)[0], run(_without_integer_lookup(model), FEED)[0])


def test_a_single_scalar_op_is_left_as_it_is():
    g = G()
    x = g.qdq("x", 0.03, 128)
    y = g.op("Add", x, _quantized_scalar(g, 0.25, np.uint8))
    out = optimize(g.model({"x": SHAPE}, [g.qdq(y, 0.03, 128)]), layout="nchw")
    assert "QLinearAdd" in ops(out) and "Gather" not in ops(out)


def test_optimizing_twice_changes_nothing():
    once = optimize(_quantized_gelu(np.uint8, 128), layout="nchw")
    twice = optimize(once, layout="nchw")
    assert ops(once) == ops(twice)
