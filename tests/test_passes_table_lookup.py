"""FuseTableLookupPass: DQ -> elementwise float chain -> Q becomes a 256-entry Gather."""

from __future__ import annotations

import numpy as np
import pytest
from _qdq_graphs import G, ops, ort_run, run

from qlinear.passes import optimize

RNG = np.random.default_rng(7)
FEED = {"x": (RNG.normal(size=(2, 16, 32)) * 2).astype(np.float32)}


def _gelu_unit(dtype, zp_in, zp_out, extra_consumer=False):
    """The GELU of a quantized transformer, with the DQ'd input read twice."""
    g = G()
    x = g.qdq("x", 0.03, zp_in, dtype)
    t = g.op("Div", x, g.const(np.array(1.4142135, np.float32)))
    t = g.op("Erf", t)
    t = g.op("Add", t, g.const(np.array(1.0, np.float32)))
    t2 = g.op("Mul", x, t)
    y = g.op("Mul", t2, g.const(np.array(0.5, np.float32)))
    outputs = [g.qdq(y, 0.02, zp_out, dtype)]
    if extra_consumer:
        outputs.append(g.op("Relu", t))  # an intermediate read outside the unit
    return g.model({"x": (2, 16, 32)}, outputs)


@pytest.mark.parametrize("dtype,zp_in,zp_out", [(np.uint8, 128, 10), (np.int8, 0, -118)])
def test_gelu_between_dq_and_q_becomes_a_table_lookup(dtype, zp_in, zp_out):
    model = _gelu_unit(dtype, zp_in, zp_out)
    out = optimize(model)
    assert "Erf" not in ops(out) and "Gather" in ops(out)
    before, after = run(model, FEED)[0], run(out, FEED)[0]
    np.testing.assert_array_equal(before, after)  # the table is the unit run in qlinear
    np.testing.assert_array_equal(ort_run(out, FEED)[0], after)  # standard ONNX, ORT loads it


def test_unit_with_an_intermediate_read_outside_is_not_fused():
    out = optimize(_gelu_unit(np.uint8, 128, 10, extra_consumer=True))
    assert "Erf" in ops(out)


def test_per_channel_constant_operand_is_not_fused():
    g = G()
    x = g.qdq("x", 0.03, 128, np.uint8)
    y = g.op("Mul", g.op("Erf", x), g.const(RNG.uniform(0.5, 2, size=(32,)).astype(np.float32)))
    out = optimize(g.model({"x": (2, 16, 32)}, [g.qdq(y, 0.02, 128, np.uint8)]))
    assert "Erf" in ops(out) and "Gather" not in ops(out)


def test_optimizing_twice_changes_nothing():
    once = optimize(_gelu_unit(np.uint8, 128, 10))
    twice = optimize(once)
    assert ops(once) == ops(twice)
