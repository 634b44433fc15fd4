"""Float pre-passes: BatchNormalization into Conv, per-channel Mul into weights/scales."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from _qdq_graphs import G, ops, run

from qlinear.passes import fold_float, optimize
from qlinear.passes.fold_scale import FoldScalePass

RNG = np.random.default_rng(4)


def test_batchnorm_folds_into_conv():
    g = G()
    w = RNG.normal(size=(6, 3, 3, 3)).astype(np.float32)
    y = g.op("Conv", "x", g.const(w), g.const(RNG.normal(size=6).astype(np.float32)))
    p = [RNG.uniform(0.5, 2, 6), RNG.normal(size=6), RNG.normal(size=6), RNG.uniform(0.5, 2, 6)]
    y = g.op("BatchNormalization", y, *[g.const(a.astype(np.float32)) for a in p])
    model = g.model({"x": (2, 3, 8, 8)}, [y])
    out = fold_float(model)
    assert ops(out) == ["Conv"]
    feed = {"x": RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(model, feed)[0], run(out, feed)[0], rtol=1e-4, atol=1e-4)


def _conv_mul(c_shape):
    g = G()
    w = RNG.normal(size=(4, 4, 1, 1)).astype(np.float32)
    y = g.op("Conv", "x", g.const(w))
    c = RNG.uniform(0.5, 2, size=c_shape).astype(np.float32)
    return g.model({"x": (1, 4, 5, 5)}, [g.op("Mul", y, g.const(c))]), w, c


def test_conv_mul_channel_factor_reshaped_along_weight_axis_0():
    model, w, c = _conv_mul((4, 1, 1))
    out = fold_float(model)
    assert ops(out) == ["Conv"]
    folded = next(t for t in out.graph.initializer if tuple(t.dims) == (4, 4, 1, 1))
    assert tuple(folded.dims) == w.shape  # a [C] factor never becomes a [C, C] outer product
    feed = {"x": RNG.normal(size=(1, 4, 5, 5)).astype(np.float32)}
    np.testing.assert_allclose(run(model, feed)[0], run(out, feed)[0], rtol=1e-5, atol=1e-5)


def test_matmul_mul_factor_along_columns():
    g = G()
    w = RNG.normal(size=(3, 5)).astype(np.float32)
    c = RNG.uniform(0.5, 2, size=5).astype(np.float32)
    model = g.model({"x": (2, 3)}, [g.op("Mul", g.op("MatMul", "x", g.const(w)), g.const(c))])
    out = fold_float(model)
    assert ops(out) == ["MatMul"]
    (folded,) = [t for t in out.graph.initializer if tuple(t.dims) == (3, 5)]
    from onnx import numpy_helper

    np.testing.assert_allclose(numpy_helper.to_array(folded), w * c.reshape(1, 5), rtol=1e-6)


def test_mul_not_per_channel_refused():
    model, _, _ = _conv_mul((4, 5, 5))
    assert not FoldScalePass()(ir.from_proto(model)).modified


def test_quantized_weight_scale_absorbs_positive_factor():
    g = G()
    x = g.qdq("x", 0.05, 128)
    y = g.op("Conv", x, g.weight(RNG.normal(size=(4, 4, 1, 1)).astype(np.float32)))
    y = g.op("Mul", y, g.const(RNG.uniform(0.5, 2, size=(4, 1, 1)).astype(np.float32)))
    model = g.model({"x": (1, 4, 5, 5)}, [g.qdq(y, 0.1, 128)])
    out = optimize(model)
    assert "Mul" not in ops(out) and "QLinearConv" in ops(out)
    feed = {"x": RNG.normal(size=(1, 4, 5, 5)).astype(np.float32)}
    assert np.abs(run(model, feed)[0] - run(out, feed)[0]).max() <= 0.1 + 1e-6


def test_folded_conv_takes_the_batchnorm_output_name():
    """Compare matches tensors by name: the pre-BN name must not label a post-BN value."""
    g = G()
    w = RNG.normal(size=(6, 3, 3, 3)).astype(np.float32)
    conv_out = g.op("Conv", "x", g.const(w))
    p = [RNG.uniform(0.5, 2, 6), RNG.normal(size=6), RNG.normal(size=6), RNG.uniform(0.5, 2, 6)]
    bn_out = g.op("BatchNormalization", conv_out, *[g.const(a.astype(np.float32)) for a in p])
    y = g.op("Relu", bn_out)
    out = fold_float(g.model({"x": (2, 3, 8, 8)}, [y]))
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert conv.output[0] == bn_out
    assert all(conv_out not in n.input and conv_out not in n.output for n in out.graph.node)


def test_folded_mul_gives_its_name_to_the_conv():
    model, _, _ = _conv_mul((4, 1, 1))
    mul_out = next(n for n in model.graph.node if n.op_type == "Mul").output[0]
    out = fold_float(model)
    assert out.graph.node[0].output[0] == mul_out == out.graph.output[0].name
