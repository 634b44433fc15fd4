"""com.microsoft QLinear* runtime ops and QGemm against onnxruntime's CPU kernels."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qlinear import Session

RNG = np.random.default_rng(3)
MS = "com.microsoft"


def _model(op, inputs: dict, consts: dict, n_out_dtype, **attrs):
    ins = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
           for k, v in inputs.items()]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()]
    names = list(inputs) + list(consts)
    order = attrs.pop("_order")
    node = helper.make_node(op, [n if n in names else "" for n in order], ["y"], domain=MS,
                            **attrs)
    out = helper.make_tensor_value_info("y", n_out_dtype, None)
    graph = helper.make_graph([node], "g", ins, [out], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19),
                                                   helper.make_opsetid(MS, 1)])


def _both(model, feeds):
    import onnxruntime as ort

    ours = Session(model, optimize=False).run(None, feeds)[0]
    theirs = ort.InferenceSession(model.SerializeToString(),
                                  providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    return ours, theirs


def _ints(dtype, shape):
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max + 1, size=shape).astype(dtype)


def _s(v):
    return np.float32(v)


DT = [np.uint8, np.int8]


def _zp(dtype, v):
    return np.array(v if dtype == np.uint8 else v - 128, dtype)


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("op", ["QLinearAdd", "QLinearMul"])
def test_binary_bit_exact(op, dtype):
    a, b = _ints(dtype, (2, 3, 8, 8)), _ints(dtype, (1, 3, 1, 8))
    consts = {"sa": _s(0.05), "za": _zp(dtype, 120), "sb": _s(0.03), "zb": _zp(dtype, 130),
              "sc": _s(0.07 if op == "QLinearAdd" else 0.5), "zc": _zp(dtype, 128)}
    model = _model(op, {"a": a, "b": b}, consts, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                   _order=["a", "sa", "za", "b", "sb", "zb", "sc", "zc"])
    ours, theirs = _both(model, {"a": a, "b": b})
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("dtype", DT)
def test_global_average_pool_bit_exact(dtype):
    x = _ints(dtype, (2, 16, 7, 7))
    consts = {"sx": _s(0.05), "zx": _zp(dtype, 128), "sy": _s(0.02), "zy": _zp(dtype, 100)}
    model = _model("QLinearGlobalAveragePool", {"x": x}, consts,
                   helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                   _order=["x", "sx", "zx", "sy", "zy"], channels_last=0)
    ours, theirs = _both(model, {"x": x})
    np.testing.assert_array_equal(ours, theirs)


UNARY = [
    ("QLinearLeakyRelu", {"alpha": 0.1}, 1),  # ~98% exact vs ORT on random inputs
    ("QLinearSigmoid", {}, 1),  # ORT's table uses MLAS's logistic approximation
    ("QLinearAveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, 1),
    ("QLinearSoftmax", {"axis": -1, "opset": 13}, 1),
]


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("op,attrs,tol", UNARY)
def test_unary_vs_ort(op, attrs, tol, dtype):
    x = _ints(dtype, (1, 4, 9, 9))
    y_scale = 1 / 256 if op == "QLinearSoftmax" else 0.03
    y_zp = _zp(dtype, 0) if op == "QLinearSoftmax" else _zp(dtype, 120)
    consts = {"sx": _s(0.05), "zx": _zp(dtype, 128), "sy": _s(y_scale), "zy": y_zp}
    model = _model(op, {"x": x}, consts, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                   _order=["x", "sx", "zx", "sy", "zy"], **attrs)
    ours, theirs = _both(model, {"x": x})
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert diff.max() <= tol, f"{op}: {np.mean(diff == 0):.4f} exact, max diff {diff.max()}"


@pytest.mark.parametrize("dtype", DT)
def test_concat_bit_exact(dtype):
    a, b = _ints(dtype, (1, 3, 4)), _ints(dtype, (1, 5, 4))
    consts = {"sy": _s(0.05), "zy": _zp(dtype, 128), "sa": _s(0.05), "za": _zp(dtype, 128),
              "sb": _s(0.08), "zb": _zp(dtype, 110)}
    model = _model("QLinearConcat", {"a": a, "b": b}, consts,
                   helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                   _order=["sy", "zy", "a", "sa", "za", "b", "sb", "zb"], axis=1)
    ours, theirs = _both(model, {"a": a, "b": b})
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("float_out", [False, True])
def test_qgemm_vs_ort(dtype, float_out):
    a = _ints(dtype, (5, 32))
    w = RNG.integers(-127, 128, size=(12, 32)).astype(np.int8)
    consts = {"sa": _s(0.05), "za": _zp(dtype, 128), "w": w,
              "sb": RNG.uniform(0.001, 0.01, 12).astype(np.float32), "zb": np.zeros(12, np.int8),
              "c": RNG.integers(-5000, 5000, 12).astype(np.int32)}
    order = ["a", "sa", "za", "w", "sb", "zb", "c"]
    out_type = TensorProto.FLOAT
    if not float_out:
        consts.update(sy=_s(0.3), zy=_zp(dtype, 125))
        order += ["sy", "zy"]
        out_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    model = _model("QGemm", {"a": a}, consts, out_type, _order=order, transB=1, alpha=1.0)
    ours, theirs = _both(model, {"a": a})
    if float_out:
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(ours, theirs)
