"""Operator-level tests: our QLinear*/Integer ops vs onnxruntime (atol=0) and onnx.reference.

ORT (1.32, CPU) refuses some legal combinations; there we compare with tests/naive.py
(bit-exact) and onnx.reference (<= 1 quantization step) only. Observed refusals
(`Case.ort` returns None):
  * QLinearConv/QLinearMatMul whose output signedness differs from the activation's
    (uint8 x -> int8 y, int8 x -> uint8 y), and int8 activations with uint8 weights;
  * QLinearConv with dilations together with auto_pad SAME_UPPER/SAME_LOWER.
onnx.reference mis-broadcasts per-channel parameters of 1-D QLinearConv (wrong output
shape); those examples are checked against ORT and tests/naive.py only.
"""

from __future__ import annotations

import contextlib
import os

import naive
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qlinear.runtime.kernels import config
from qlinear.runtime.kernels.conv import resolve_pads
from qlinear.runtime.ops.contrib import dynamic_quantize_uint8
from qlinear.runtime.registry import MS_DOMAIN, NodeSpec, lookup

PATHS = [
    pytest.param("vnni", marks=pytest.mark.skipif(not config.host_has_vnni(),
                                                  reason="CPU has no AVX512-VNNI")),
    pytest.param("portable"),
]
_TT = {np.dtype(np.uint8): onnx.TensorProto.UINT8, np.dtype(np.int8): onnx.TensorProto.INT8,
       np.dtype(np.int32): onnx.TensorProto.INT32, np.dtype(np.float32): onnx.TensorProto.FLOAT}


@contextlib.contextmanager
def kernel_family(name: str | None):
    """QLINEAR_KERNELS=name for the duration (hypothesis-safe, unlike monkeypatch)."""
    old = os.environ.get("QLINEAR_KERNELS")
    if name is not None:
        os.environ["QLINEAR_KERNELS"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("QLINEAR_KERNELS", None)
        else:
            os.environ["QLINEAR_KERNELS"] = old


with_kernels = pytest.mark.parametrize("kernels", PATHS)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _rand(rng, shape, dtype):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape).astype(dtype)


class Case:
    """One node with named inputs (None = omitted), some of them initializers."""

    def __init__(self, op, inputs, consts=(), attrs=None, domain="", opset=13,
                 out_dtype=np.uint8):
        self.op, self.inputs, self.consts = op, inputs, set(consts)
        self.attrs, self.domain, self.opset = attrs or {}, domain, opset
        self.out_dtype = np.dtype(out_dtype)
        names = [f"i{i}" if v is not None else "" for i, v in enumerate(inputs)]
        while names and names[-1] == "":
            names.pop()
        self.node = helper.make_node(op, names, ["y"], domain=domain, **self.attrs)

    def model(self) -> onnx.ModelProto:
        graph_inputs, inits = [], []
        for i, v in enumerate(self.inputs):
            if v is None:
                continue
            if i in self.consts:
                inits.append(numpy_helper.from_array(np.asarray(v), f"i{i}"))
            else:
                graph_inputs.append(helper.make_tensor_value_info(
                    f"i{i}", _TT[np.asarray(v).dtype], list(np.shape(v))))
        graph = helper.make_graph(
            [self.node], "g", graph_inputs,
            [helper.make_tensor_value_info("y", _TT[self.out_dtype], None)], inits)
        opsets = [helper.make_opsetid("", self.opset)]
        if self.domain:
            opsets.append(helper.make_opsetid(self.domain, 1))
        return helper.make_model(graph, opset_imports=opsets, ir_version=9)

    def feeds(self):
        return {f"i{i}": np.asarray(v) for i, v in enumerate(self.inputs)
                if v is not None and i not in self.consts}

    def ours(self, kernels: str | None = None) -> np.ndarray:
        with kernel_family(kernels):
            return self._ours()

    def _ours(self) -> np.ndarray:
        spec = NodeSpec(self.node, self.opset if not self.domain else 1,
                        consts={i: np.asarray(v) for i, v in enumerate(self.inputs)
                                if i in self.consts and v is not None})
        factory = lookup(self.domain, self.op, spec.opset)
        assert factory is not None
        args = [None if v is None else np.asarray(v) for v in self.inputs]
        while args and args[-1] is None:
            args.pop()
        return factory(spec)(*args)

    def ort(self) -> np.ndarray | None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            sess = ort.InferenceSession(self.model().SerializeToString(), so,
                                        providers=["CPUExecutionProvider"])
            return sess.run(None, self.feeds())[0]
        except Exception:  # ORT refuses this (legal) combination
            return None

    def reference(self) -> np.ndarray:
        return ReferenceEvaluator(self.model()).run(None, self.feeds())[0]


def _within_one_step(ours, ref):
    diff = np.abs(ours.astype(np.int64) - ref.astype(np.int64))
    assert diff.max(initial=0) <= 1, f"max diff {diff.max()}"


# --------------------------------------------------------------------------- QLinearConv


@st.composite
def qconv_cases(draw):
    nd = draw(st.sampled_from([1, 2, 2]))
    k = tuple(draw(st.sampled_from([1, 3, 5, 7])) for _ in range(nd))
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if kind == "dense":
        groups, cg, cog = 1, draw(st.integers(1, 24)), draw(st.integers(1, 70))
    elif kind == "grouped":
        groups, cg, cog = draw(st.integers(2, 4)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
    else:
        groups, cg, cog = draw(st.integers(2, 20)), 1, 1
    strides = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    pads = [draw(st.integers(0, 3)) for _ in range(2 * nd)]
    lo = [dil[i] * (k[i] - 1) + 1 for i in range(nd)]
    sp = tuple(draw(st.integers(lo[i], max(lo[i], 12))) for i in range(nd))
    x_dtype = draw(st.sampled_from([np.uint8, np.int8]))
    return dict(nd=nd, k=k, groups=groups, cg=cg, cog=cog, strides=strides, dil=dil,
                auto_pad=auto_pad, pads=pads, sp=sp, x_dtype=x_dtype,
                w_dtype=draw(st.sampled_from([np.int8, np.int8, np.uint8])),
                y_dtype=x_dtype if draw(st.booleans()) else draw(st.sampled_from([np.uint8,
                                                                                 np.int8])),
                per_channel=draw(st.booleans()), zero_w_zp=draw(st.booleans()),
                bias=draw(st.booleans()), y_scale=draw(st.sampled_from([1e-3, 0.02, 0.5, 50.0])),
                const_w=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


def _qconv_case(c):
    rng = np.random.default_rng(c["seed"])
    c_in, c_out = c["groups"] * c["cg"], c["groups"] * c["cog"]
    x = _rand(rng, (1, c_in, *c["sp"]), c["x_dtype"])
    w = _rand(rng, (c_out, c["cg"], *c["k"]), c["w_dtype"])
    n_w = c_out if c["per_channel"] else 1
    w_scale = rng.uniform(0.001, 0.05, n_w).astype(np.float32)
    w_zp = (np.zeros(n_w) if c["zero_w_zp"] else _rand(rng, n_w, c["w_dtype"])).astype(
        c["w_dtype"])
    if not c["per_channel"]:
        w_scale, w_zp = w_scale[0], w_zp[0]
    attrs = {"group": c["groups"], "kernel_shape": list(c["k"]), "strides": list(c["strides"]),
             "dilations": list(c["dil"])}
    if c["auto_pad"] == "NOTSET":
        attrs["pads"] = c["pads"]
    else:
        attrs["auto_pad"] = c["auto_pad"]
    bias = rng.integers(-5000, 5000, c_out).astype(np.int32) if c["bias"] else None
    inputs = [x, np.float32(0.03), _rand(rng, (), c["x_dtype"]), w, w_scale, w_zp,
              np.float32(c["y_scale"]), _rand(rng, (), c["y_dtype"]), bias]
    consts = {1, 2, 4, 5, 6, 7, 8} | ({3} if c["const_w"] else set())
    return Case("QLinearConv", inputs, consts, attrs, opset=13, out_dtype=c["y_dtype"])


@with_kernels
@settings(max_examples=40, deadline=None)
@given(c=qconv_cases())
def test_qlinear_conv_vs_ort_and_reference(kernels, c):
    case = _qconv_case(c)
    ours = case.ours(kernels)
    x, xs, xzp, w, ws, wzp, ys, yzp, bias = case.inputs
    begin, end = resolve_pads(c["auto_pad"], x.shape[2:], c["k"], c["strides"], c["dil"],
                              c["pads"])
    np.testing.assert_array_equal(ours, naive.conv_requantized(
        x, xs, xzp, w, ws, wzp, ys, yzp, bias, group=c["groups"], strides=c["strides"],
        dilations=c["dil"], begin=begin, end=end))
    want = case.ort()
    if want is not None:
        np.testing.assert_array_equal(ours, want)
    ref = case.reference()
    if ref.shape == ours.shape:  # onnx.reference mis-broadcasts 1-D per-channel QLinearConv
        _within_one_step(ours, ref)


@with_kernels
def test_qlinear_conv_matches_naive_where_ort_refuses(kernels, rng):
    """int8 x, uint8 w, per-channel distinct nonzero w_zp, int8 y: ORT has no kernel."""
    x = _rand(rng, (1, 6, 9, 9), np.int8)
    w = _rand(rng, (10, 3, 3, 3), np.uint8)
    w_scale = rng.uniform(0.001, 0.05, 10).astype(np.float32)
    w_zp = _rand(rng, 10, np.uint8)
    bias = rng.integers(-5000, 5000, 10).astype(np.int32)
    attrs = {"group": 2, "kernel_shape": [3, 3], "strides": [2, 1], "pads": [1, 0, 2, 1]}
    case = Case("QLinearConv", [x, np.float32(0.03), np.int8(-7), w, w_scale, w_zp,
                                np.float32(0.4), np.int8(3), bias], range(1, 9), attrs,
                out_dtype=np.int8)
    ours = case.ours(kernels)
    want = naive.conv_requantized(x, 0.03, -7, w, w_scale, w_zp, 0.4, np.int8(3), bias,
                                  group=2, strides=(2, 1), begin=(1, 0), end=(2, 1))
    np.testing.assert_array_equal(ours, want)
    _within_one_step(ours, case.reference())


# --------------------------------------------------------------------------- QLinearMatMul


@st.composite
def qmatmul_cases(draw):
    m, k, n = draw(st.integers(1, 40)), draw(st.integers(1, 300)), draw(st.integers(1, 140))
    batch_a = draw(st.sampled_from([(), (2,), (3, 1), (1,)]))
    b_batched = draw(st.sampled_from([False, False, True]))
    batch_b = draw(st.sampled_from([(2,), (1, 3), (3,)])) if b_batched else ()
    if b_batched and len(batch_a) == 1 and batch_a[0] not in (1,) and batch_b[-1] != batch_a[0]:
        batch_b = (1,)
    a_dtype = draw(st.sampled_from([np.uint8, np.int8]))
    return dict(m=m, k=k, n=n, batch_a=batch_a, batch_b=batch_b, a_dtype=a_dtype,
                b_dtype=draw(st.sampled_from([np.int8, np.uint8])),
                y_dtype=a_dtype if draw(st.booleans()) else draw(st.sampled_from([np.uint8,
                                                                                 np.int8])),
                per_column=draw(st.booleans()) and not b_batched,
                y_scale=draw(st.sampled_from([1e-4, 0.05, 1.0, 1e3])),
                const_b=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


def _qmatmul_case(c):
    rng = np.random.default_rng(c["seed"])
    a = _rand(rng, (*c["batch_a"], c["m"], c["k"]), c["a_dtype"])
    b = _rand(rng, (*c["batch_b"], c["k"], c["n"]), c["b_dtype"])
    nb = c["n"] if c["per_column"] else 1
    b_scale = rng.uniform(0.001, 0.05, nb).astype(np.float32)
    b_zp = _rand(rng, nb, c["b_dtype"])
    if not c["per_column"]:
        b_scale, b_zp = b_scale[0], b_zp[0]
    inputs = [a, np.float32(0.02), _rand(rng, (), c["a_dtype"]), b, b_scale, b_zp,
              np.float32(c["y_scale"]), _rand(rng, (), c["y_dtype"])]
    consts = {1, 2, 4, 5, 6, 7} | ({3} if c["const_b"] else set())
    return Case("QLinearMatMul", inputs, consts, opset=13, out_dtype=c["y_dtype"])


@with_kernels
@settings(max_examples=40, deadline=None)
@given(c=qmatmul_cases())
def test_qlinear_matmul_vs_ort_and_reference(kernels, c):
    case = _qmatmul_case(c)
    ours = case.ours(kernels)
    want = case.ort()
    ref = case.reference()
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    if want is not None:
        np.testing.assert_array_equal(ours, want)
    _within_one_step(ours, ref)


@with_kernels
@settings(max_examples=3, deadline=None)
@given(k=st.integers(2000, 4608), n=st.integers(1, 100), seed=st.integers(0, 2**32 - 1))
def test_qlinear_matmul_large_k_vs_ort(kernels, k, n, seed):
    c = dict(m=5, k=k, n=n, batch_a=(), batch_b=(), a_dtype=np.uint8, b_dtype=np.int8,
             y_dtype=np.uint8, per_column=True, y_scale=3.0, const_b=True, seed=seed)
    case = _qmatmul_case(c)
    want = case.ort()
    assert want is not None
    np.testing.assert_array_equal(case.ours(kernels), want)


@pytest.mark.parametrize("a_dtype", [np.uint8, np.int8])
def test_a_constant_qlinear_matmul_resolves_each_activation_shape_once(a_dtype):
    """Constant B and parameters: one kernel keeps a prepared call per activation shape,
    dtype and contiguity; changing shapes and a strided activation stay exact."""
    rng = np.random.default_rng(7)
    k, n = 37, 70
    base = dict(m=1, k=k, n=n, batch_a=(), batch_b=(), a_dtype=a_dtype, b_dtype=np.int8,
                y_dtype=np.uint8, per_column=True, y_scale=0.05, const_b=True, seed=3)
    case = _qmatmul_case(base)
    spec = NodeSpec(case.node, 13, consts={i: np.asarray(case.inputs[i]) for i in case.consts})
    kernel = lookup("", "QLinearMatMul", 13)(spec)
    wide = _rand(rng, (6, 2 * k), a_dtype)
    for a in [_rand(rng, (5, k), a_dtype), _rand(rng, (2, 3, k), a_dtype), wide[:, ::2],
              _rand(rng, (5, k), a_dtype), wide[:, 1::2]]:
        inputs = [np.asarray(v) for v in (a, *case.inputs[1:])]
        # the general path: a_zero_point fed at run time, so nothing is prepared
        general = Case("QLinearMatMul", inputs, case.consts - {2}, opset=13).ours()
        np.testing.assert_array_equal(kernel(*inputs), general)
        want = Case("QLinearMatMul", inputs, case.consts, opset=13).ort()
        if want is not None:  # ORT has no int8 x uint8 -> uint8 QLinearMatMul
            np.testing.assert_array_equal(general, want)


# --------------------------------------------------------------------------- *Integer ops


@with_kernels
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 30), k=st.integers(1, 200), n=st.integers(1, 100),
       a_dtype=st.sampled_from([np.uint8, np.int8]), b_dtype=st.sampled_from([np.uint8, np.int8]),
       per_column=st.booleans(), batch=st.sampled_from([(), (2,), (2, 1)]),
       seed=st.integers(0, 2**32 - 1))
def test_matmul_integer_vs_ort(kernels, m, k, n, a_dtype, b_dtype, per_column, batch, seed):
    rng = np.random.default_rng(seed)
    a = _rand(rng, (*batch, m, k), a_dtype)
    b = _rand(rng, (k, n), b_dtype)
    b_zp = _rand(rng, n if per_column else (), b_dtype)
    case = Case("MatMulInteger", [a, b, _rand(rng, (), a_dtype), b_zp], {1, 2, 3},
                out_dtype=np.int32)
    ours = case.ours(kernels)
    want = case.ort()
    np.testing.assert_array_equal(ours, want if want is not None else case.reference())
    np.testing.assert_array_equal(ours, naive.matmul_integer(a, case.inputs[2], b, b_zp))


def test_matmul_integer_per_row_a_zero_point(rng):
    a = _rand(rng, (4, 9), np.uint8)
    b = _rand(rng, (9, 5), np.int8)
    a_zp = _rand(rng, (4, 1), np.uint8)
    ours = Case("MatMulInteger", [a, b, a_zp], {1}, out_dtype=np.int32).ours()
    np.testing.assert_array_equal(ours, naive.matmul_integer(a, a_zp, b, 0))


@with_kernels
@settings(max_examples=20, deadline=None)
@given(c=qconv_cases())
def test_conv_integer_vs_ort(kernels, c):
    rng = np.random.default_rng(c["seed"])
    c_in, c_out = c["groups"] * c["cg"], c["groups"] * c["cog"]
    x = _rand(rng, (2, c_in, *c["sp"]), c["x_dtype"])
    w = _rand(rng, (c_out, c["cg"], *c["k"]), c["w_dtype"])
    attrs = {"group": c["groups"], "strides": list(c["strides"]), "dilations": list(c["dil"]),
             "pads": c["pads"]}
    x_zp, w_zp = _rand(rng, (), c["x_dtype"]), _rand(rng, (), c["w_dtype"])
    case = Case("ConvInteger", [x, w, x_zp, w_zp], {1, 2, 3}, attrs, out_dtype=np.int32)
    ours = case.ours(kernels)
    want = case.ort()
    nd = c["nd"]
    np.testing.assert_array_equal(ours, naive.conv_integer(
        x, x_zp, w, w_zp, c["groups"], c["strides"], c["dil"], tuple(c["pads"][:nd]),
        tuple(c["pads"][nd:])))
    if want is not None:
        np.testing.assert_array_equal(ours, want)


# --------------------------------------------------------------------------- contrib (int8 -> f32)


def _close_to_ort(ours, want):
    """Float rounding only: the int32 accumulator is exact; ORT may order the ops differently."""
    tol = np.float32(np.spacing(np.float32(np.abs(want).max(initial=1.0))))
    np.testing.assert_allclose(ours, want, rtol=1e-6, atol=float(tol))


@with_kernels
@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 30), k=st.integers(1, 300), n=st.integers(1, 100),
       b_dtype=st.sampled_from([np.uint8, np.int8]), per_column=st.booleans(),
       bias=st.booleans(), batch=st.sampled_from([(), (3,)]), seed=st.integers(0, 2**32 - 1))
def test_matmul_integer_to_float_vs_ort(kernels, m, k, n, b_dtype, per_column, bias, batch,
                                        seed):
    rng = np.random.default_rng(seed)
    a = _rand(rng, (*batch, m, k), np.uint8)
    b = _rand(rng, (k, n), b_dtype)
    nb = n if per_column else 1
    b_scale = rng.uniform(1e-3, 1e-1, nb).astype(np.float32)
    b_zp = _rand(rng, nb, b_dtype)
    if not per_column:
        b_scale, b_zp = b_scale[0], b_zp[0]
    fb = rng.normal(size=n).astype(np.float32) if bias else None
    case = Case("MatMulIntegerToFloat", [a, b, np.float32(0.05), b_scale, np.uint8(7), b_zp, fb],
                {1, 2, 3, 4, 5, 6}, domain=MS_DOMAIN, out_dtype=np.float32)
    ours = case.ours(kernels)
    acc = naive.matmul_integer(a, 7, b, b_zp).astype(np.float32)
    scale = np.float32(0.05) * np.asarray(b_scale, np.float32)
    np.testing.assert_array_equal(ours, acc * scale + (fb if bias else np.float32(0)))
    want = case.ort()
    if want is not None:
        _close_to_ort(ours, want)


@with_kernels
@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 20), k=st.integers(1, 300), n=st.integers(1, 100),
       b_dtype=st.sampled_from([np.uint8, np.int8]), bias=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_dynamic_quantize_matmul_vs_ort(kernels, m, k, n, b_dtype, bias, seed):
    rng = np.random.default_rng(seed)
    a = (rng.normal(size=(m, k)) * rng.uniform(0.1, 10)).astype(np.float32)
    b = _rand(rng, (k, n), b_dtype)
    b_zp = _rand(rng, (), b_dtype)
    fb = rng.normal(size=n).astype(np.float32) if bias else None
    case = Case("DynamicQuantizeMatMul", [a, b, np.float32(0.01), b_zp, fb], {1, 2, 3, 4},
                domain=MS_DOMAIN, out_dtype=np.float32)
    ours = case.ours(kernels)
    q, a_scale, a_zp = dynamic_quantize_uint8(a)
    acc = naive.matmul_integer(q, a_zp, b, b_zp).astype(np.float32)
    np.testing.assert_array_equal(ours, acc * (a_scale * np.float32(0.01))
                                  + (fb if bias else np.float32(0)))
    want = case.ort()
    assert want is not None
    _close_to_ort(ours, want)


@with_kernels
@pytest.mark.parametrize("x_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("y_scale", [1e-6, 1e6])
def test_extreme_zero_points_and_scales_saturate_both_ways(kernels, x_dtype, y_scale, rng):
    """Extreme zero points (type min/max) with a tiny / huge output scale: outputs pinned
    at both ends of the range (tiny) or at the zero point (huge), as ORT computes them."""
    info = np.iinfo(x_dtype)
    x = _rand(rng, (1, 8, 7, 7), x_dtype)
    w = _rand(rng, (16, 8, 3, 3), np.int8)
    w_zp = np.where(np.arange(16) % 2 == 0, -128, 127).astype(np.int8)
    for x_zp, y_zp in ((info.min, info.max), (info.max, info.min)):
        case = Case("QLinearConv", [x, np.float32(0.05), x_dtype(x_zp), w,
                                    np.full(16, 0.02, np.float32), w_zp, np.float32(y_scale),
                                    x_dtype(y_zp), None],
                    range(1, 8), {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]},
                    out_dtype=x_dtype)
        ours = case.ours(kernels)
        want = naive.conv_requantized(x, 0.05, x_zp, w, np.full(16, 0.02, np.float32), w_zp,
                                      y_scale, x_dtype(y_zp), begin=(1, 1), end=(1, 1))
        np.testing.assert_array_equal(ours, want)
        if y_scale < 1:
            assert ours.min() == info.min and ours.max() == info.max
        ort_out = case.ort()
        if ort_out is not None:
            np.testing.assert_array_equal(ours, ort_out)
        a = _rand(rng, (5, 40), x_dtype)
        b = _rand(rng, (40, 9), np.int8)
        mm = Case("QLinearMatMul", [a, np.float32(0.05), x_dtype(x_zp), b, np.float32(0.02),
                                    np.int8(127), np.float32(y_scale), x_dtype(y_zp)],
                  range(1, 8), out_dtype=x_dtype)
        got = mm.ours(kernels)
        acc = naive.matmul_integer(a, x_zp, b, 127)
        np.testing.assert_array_equal(got, naive.requantize(
            acc, naive.multiplier(0.05, 0.02, y_scale), y_zp, x_dtype))
        ort_mm = mm.ort()
        if ort_mm is not None:
            np.testing.assert_array_equal(got, ort_mm)
