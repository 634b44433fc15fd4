"""FuseInt8FloatPass: int8 inputs with float output (static and dynamic)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _qdq_graphs import G, ops, ort_run, run

from qlinear.passes import optimize
from qlinear.runtime.registry import lookup

RNG = np.random.default_rng(5)
pytestmark = pytest.mark.skipif(
    lookup("com.microsoft", "MatMulIntegerToFloat", 1) is None,
    reason="MatMulIntegerToFloat runtime op not landed",
)


@pytest.mark.parametrize("dtype,zp", [(np.uint8, 128), (np.int8, 0)])
def test_matmul_float_output_with_bias(dtype, zp):
    g = G()
    x = g.qdq("x", 0.05, zp, dtype)
    w = RNG.normal(size=(16, 8)).astype(np.float32)
    y = g.op("Add", g.op("MatMul", x, g.weight(w, axis=1)),
             g.const(RNG.normal(size=8).astype(np.float32)))
    model = g.model({"x": (3, 16)}, [y])
    out = optimize(model)
    assert ops(out).count("MatMulIntegerToFloat") == 1 and "Add" not in ops(out)
    feed = {"x": RNG.normal(size=(3, 16)).astype(np.float32)}
    np.testing.assert_allclose(run(model, feed)[0], run(out, feed)[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ort_run(out, feed)[0], run(out, feed)[0], rtol=1e-4, atol=1e-4)


def test_gemm_float_output_becomes_qgemm():
    g = G()
    x = g.qdq("x", 0.05, 128)
    w = RNG.normal(size=(4, 16)).astype(np.float32)
    y = g.op("Gemm", x, g.weight(w, axis=0), g.const(RNG.normal(size=4).astype(np.float32)),
             transB=1)
    model = g.model({"x": (3, 16)}, [y])
    out = optimize(model)
    assert ops(out).count("QGemm") == 1
    feed = {"x": RNG.normal(size=(3, 16)).astype(np.float32)}
    np.testing.assert_allclose(run(model, feed)[0], run(out, feed)[0], rtol=1e-3, atol=1e-3)


def test_dynamic_quantize_chain(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    g = G()
    w = RNG.normal(size=(16, 8)).astype(np.float32)
    y = g.op("Add", g.op("MatMul", "x", g.const(w)), g.const(np.ones(8, np.float32)))
    path = tmp_path / "f.onnx"
    onnx.save(g.model({"x": (3, 16)}, [y], opset=17), path)
    quantize_dynamic(str(path), str(tmp_path / "d.onnx"), weight_type=QuantType.QInt8)
    model = onnx.load(tmp_path / "d.onnx")
    assert "MatMulInteger" in ops(model)
    out = optimize(model)
    assert "MatMulIntegerToFloat" in ops(out) and "MatMulInteger" not in ops(out)
    feed = {"x": RNG.normal(size=(3, 16)).astype(np.float32)}
    np.testing.assert_allclose(run(model, feed)[0], run(out, feed)[0], rtol=1e-4, atol=1e-4)
