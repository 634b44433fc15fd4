"""Channels-last ops (com.microsoft QLinearConv/NhwcMaxPool, ai.qlinear.ConvInteger).

Each is compared bit-exactly with the NCHW op on transposed data (qlinear's own NCHW
kernels and onnxruntime's CPU kernels), so the NHWC kernels are held to the same
arithmetic as everything else.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qlinear import Session
from qlinear.runtime.ops.nhwc import QLINEAR_DOMAIN
from qlinear.runtime.registry import lookup

RNG = np.random.default_rng(11)
MS = "com.microsoft"
NHWC = (0, 2, 3, 1)
NCHW = (0, 3, 1, 2)


def _model(nodes, inputs: dict, consts: dict, out_dtype, domain_opsets=(MS,)):
    ins = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
           for k, v in inputs.items()]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()]
    out = helper.make_tensor_value_info("y", out_dtype, None)
    graph = helper.make_graph(nodes, "g", ins, [out], inits)
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, 1) for d in domain_opsets]
    return helper.make_model(graph, opset_imports=opsets)


def _ints(dtype, shape, lo=None, hi=None):
    info = np.iinfo(dtype)
    lo = info.min if lo is None else lo
    hi = info.max if hi is None else hi
    return RNG.integers(lo, hi + 1, size=shape).astype(dtype)


def _ort(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


CONV_CASES = [
    # (c_in, c_out, group, kernel, stride, pads, dilation, h, w)
    (8, 16, 1, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 6, 5),  # pointwise, zero-copy path
    (3, 8, 1, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 9, 7),  # stem: C not a multiple of 4
    (6, 6, 2, (3, 3), (1, 1), (0, 1, 2, 1), (2, 1), 8, 8),  # grouped, asymmetric pads, dilated
    (12, 12, 12, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 7, 6),  # depthwise
    (8, 8, 8, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 9, 9),  # depthwise stride 2
    (4, 8, 4, (3, 3), (1, 2), (1, 0, 1, 0), (1, 1), 5, 9),  # depthwise, multiplier 2
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_conv_channels_last_bit_exact(case, dtype):
    c_in, c_out, group, k, s, pads, d, h, w = case
    x = _ints(dtype, (2, c_in, h, w))
    wq = _ints(np.int8, (c_out, c_in // group, *k), -60, 60)
    w_zp = _ints(np.int8, (c_out,), -3, 3)  # distinct per-channel zero points
    consts = {
        "xs": np.float32(0.04), "xz": np.array(7 if dtype == np.uint8 else -5, dtype),
        "w": wq, "ws": RNG.uniform(0.001, 0.01, c_out).astype(np.float32), "wz": w_zp,
        "ys": np.float32(0.3), "yz": np.array(120 if dtype == np.uint8 else 3, dtype),
        "b": RNG.integers(-500, 500, c_out).astype(np.int32),
    }
    attrs = dict(kernel_shape=list(k), strides=list(s), pads=list(pads), dilations=list(d),
                 group=group)
    ins = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"]
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nchw = _model([helper.make_node("QLinearConv", ins, ["y"], **attrs)], {"x": x}, consts, et)
    nhwc = _model([helper.make_node("QLinearConv", ins, ["y"], domain=MS, channels_last=1,
                                    **attrs)], {"x": x.transpose(NHWC)}, consts, et)
    ref = Session(nchw, optimize=False).run(None, {"x": x})[0]
    ours = Session(nhwc, optimize=False).run(None, {"x": np.ascontiguousarray(
        x.transpose(NHWC))})[0]
    np.testing.assert_array_equal(ours, ref.transpose(NHWC))
    consts["wz"] = np.zeros(c_out, np.int8)  # ORT's MS QLinearConv wants symmetric weights
    nhwc = _model([helper.make_node("QLinearConv", ins, ["y"], domain=MS, channels_last=1,
                                    **attrs)], {"x": x.transpose(NHWC)}, consts, et)
    xt = np.ascontiguousarray(x.transpose(NHWC))
    np.testing.assert_array_equal(Session(nhwc, optimize=False).run(None, {"x": xt})[0],
                                  _ort(nhwc, {"x": xt}))


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[3]])
def test_conv_integer_nhwc_matches_nchw(case):
    c_in, c_out, group, k, s, pads, d, h, w = case
    x = _ints(np.uint8, (1, c_in, h, w))
    consts = {"w": _ints(np.int8, (c_out, c_in // group, *k)), "xz": np.uint8(9),
              "wz": np.int8(2)}
    attrs = dict(kernel_shape=list(k), strides=list(s), pads=list(pads), dilations=list(d),
                 group=group)
    ins = ["x", "w", "xz", "wz"]
    nchw = _model([helper.make_node("ConvInteger", ins, ["y"], **attrs)], {"x": x}, consts,
                  TensorProto.INT32)
    nhwc = _model([helper.make_node("ConvInteger", ins, ["y"], domain=QLINEAR_DOMAIN,
                                    channels_last=1, **attrs)],
                  {"x": x.transpose(NHWC)}, consts, TensorProto.INT32, (QLINEAR_DOMAIN,))
    ref = Session(nchw, optimize=False).run(None, {"x": x})[0]
    xt = np.ascontiguousarray(x.transpose(NHWC))
    np.testing.assert_array_equal(Session(nhwc, optimize=False).run(None, {"x": xt})[0],
                                  ref.transpose(NHWC))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize(
    "attrs",
    [
        dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        dict(kernel_shape=[2, 2], strides=[2, 2]),
        dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
        dict(kernel_shape=[2, 3], dilations=[2, 1], pads=[0, 1, 1, 0]),
    ],
)
def test_nhwc_max_pool_matches_ort(dtype, attrs):
    x = _ints(dtype, (2, 9, 10, 5))
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    model = _model([helper.make_node("NhwcMaxPool", ["x"], ["y"], domain=MS, **attrs)],
                   {"x": x}, {}, et)
    np.testing.assert_array_equal(Session(model, optimize=False).run(None, {"x": x})[0],
                                  _ort(model, {"x": x}))


def test_ops_registered():
    for domain, op in [(MS, "QLinearConv"), (MS, "NhwcMaxPool"), (QLINEAR_DOMAIN, "ConvInteger")]:
        assert lookup(domain, op, 1) is not None, (domain, op)


def test_domain_name_shared_with_passes():
    from qlinear.passes.layout_analysis import QLINEAR_DOMAIN as PASS_DOMAIN

    assert PASS_DOMAIN == QLINEAR_DOMAIN


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[3]])
def test_a_constant_conv_keeps_one_plan_per_input_shape_and_kernel_choice(case, monkeypatch):
    """With every parameter constant the op keeps its plans by input shape (no parameter
    checks per call): shapes and QLINEAR_KERNELS changing between runs still give the
    exact result of a fresh session."""
    c_in, c_out, group, k, s, pads, d, _, _ = case
    consts = {
        "xs": np.float32(0.04), "xz": np.array(7, np.uint8),
        "w": _ints(np.int8, (c_out, c_in // group, *k), -60, 60),
        "ws": RNG.uniform(0.001, 0.01, c_out).astype(np.float32),
        "wz": _ints(np.int8, (c_out,), -3, 3), "ys": np.float32(0.3),
        "yz": np.array(120, np.uint8), "b": RNG.integers(-500, 500, c_out).astype(np.int32),
    }
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"],
                            ["y"], domain=MS, channels_last=1, kernel_shape=list(k),
                            strides=list(s), pads=list(pads), dilations=list(d), group=group)
    model = _model([node], {"x": _ints(np.uint8, (1, 9, 9, c_in))}, consts, TensorProto.UINT8)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "n"
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "h"
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "w"
    session = Session(model, optimize=False)
    for shape, kernels in [((1, 9, 9), "auto"), ((2, 7, 11), "auto"), ((1, 9, 9), "portable"),
                           ((2, 7, 11), "portable"), ((1, 9, 9), "auto")]:
        monkeypatch.setenv("QLINEAR_KERNELS", kernels)
        x = _ints(np.uint8, (*shape, c_in))
        want = Session(model, optimize=False).run(None, {"x": x})[0]
        np.testing.assert_array_equal(session.run(None, {"x": x})[0], want)


def test_a_constant_conv_still_names_an_input_with_the_wrong_channel_count():
    """The per-shape plans must not skip the input check a plan is built with."""
    from qlinear.errors import QlinearError

    c_in, c_out = 8, 16
    consts = {
        "xs": np.float32(0.02), "xz": np.array(128, np.uint8),
        "w": _ints(np.int8, (c_out, c_in, 1, 1)), "ws": np.full(c_out, 0.01, np.float32),
        "wz": np.zeros(c_out, np.int8), "ys": np.float32(0.05), "yz": np.array(128, np.uint8),
    }
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"],
                            ["y"], domain=MS, channels_last=1)
    model = _model([node], {"x": _ints(np.uint8, (1, 4, 4, c_in))}, consts, TensorProto.UINT8)
    for i, name in enumerate("nhwc"):
        model.graph.input[0].type.tensor_type.shape.dim[i].dim_param = name
    session = Session(model, optimize=False)
    session.run(None, {"x": _ints(np.uint8, (1, 4, 4, c_in))})
    with pytest.raises(QlinearError, match=r"\(1, 4, 4, 5\).*C_in=8"):
        session.run(None, {"x": _ints(np.uint8, (1, 4, 4, 5))})
