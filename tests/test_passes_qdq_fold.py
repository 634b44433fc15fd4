"""CancelDQQPass and IntegerDataMovementPass: exact Q/DQ folds."""

from __future__ import annotations

import numpy as np
import pytest
from _qdq_graphs import G, ops, run

from qlinear.passes import optimize

RNG = np.random.default_rng(1)
FEED = {"x": RNG.normal(size=(1, 4, 6, 6)).astype(np.float32)}


def test_dq_q_identical_cancels_and_double_pairs_collapse():
    g = G()
    q = g.q("x", 0.05, 128)
    q2 = g.q(g.dq(q, 0.05, 128), 0.05, 128)  # Q -> DQ -> Q: the inner pair cancels
    y = g.dq(q2, 0.05, 128)
    model = g.model({"x": (1, 4, 6, 6)}, [y])
    out = optimize(model)
    assert ops(out).count("QuantizeLinear") == 1
    np.testing.assert_array_equal(run(model, FEED)[0], run(out, FEED)[0])


def test_dq_q_different_params_stays_one_requantize():
    g = G()
    y = g.dq(g.q(g.dq(g.q("x", 0.05, 128), 0.05, 128), 0.1, 100), 0.1, 100)
    out = optimize(g.model({"x": (1, 4, 6, 6)}, [y]))
    assert ops(out).count("QuantizeLinear") == 2


@pytest.mark.parametrize("op,attrs,extra", [
    ("Transpose", {"perm": [0, 2, 3, 1]}, []),
    ("MaxPool", {"kernel_shape": [2, 2]}, []),
    ("Flatten", {}, []),
    ("Reshape", {}, [np.array([1, -1], np.int64)]),
])
@pytest.mark.parametrize("dtype,zp", [(np.uint8, 128), (np.int8, 0)])
def test_data_movement_runs_on_integers(op, attrs, extra, dtype, zp):
    g = G()
    x = g.qdq("x", 0.05, zp, dtype)
    y = g.op(op, x, *[g.const(e) for e in extra], **attrs)
    y = g.dq(g.q(y, 0.05, zp, dtype), 0.05, zp, dtype)
    model = g.model({"x": (1, 4, 6, 6)}, [y])
    out = optimize(model)
    node = next(n for n in out.graph.node if n.op_type == op)
    producer = {o: n.op_type for n in out.graph.node for o in n.output}
    assert producer[node.input[0]] == "QuantizeLinear"
    np.testing.assert_array_equal(run(model, FEED)[0], run(out, FEED)[0])


def test_data_movement_with_other_params_requantizes_once():
    g = G()
    y = g.qdq(g.op("Transpose", g.qdq("x", 0.05, 128), perm=[0, 2, 3, 1]), 0.07, 120)
    model = g.model({"x": (1, 4, 6, 6)}, [y])
    out = optimize(model)
    np.testing.assert_array_equal(run(model, FEED)[0], run(out, FEED)[0])


def test_concat_shared_params_on_integers():
    g = G()
    a = g.qdq("x", 0.05, 128)
    b = g.qdq(g.op("Relu", "x"), 0.05, 128)
    y = g.qdq(g.op("Concat", a, b, axis=1), 0.05, 128)
    model = g.model({"x": (1, 4, 6, 6)}, [y])
    out = optimize(model)
    assert "Concat" in ops(out) and "QLinearConcat" not in ops(out)
    np.testing.assert_array_equal(run(model, FEED)[0], run(out, FEED)[0])


def test_idempotent():
    g = G()
    y = g.qdq(g.op("Transpose", g.qdq("x", 0.05, 128), perm=[0, 2, 3, 1]), 0.05, 128)
    once = optimize(g.model({"x": (1, 4, 6, 6)}, [y]))
    assert ops(optimize(once)) == ops(once)
