"""ONNX's own node conformance cases, run through qlinear.Session with native kernels only."""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qlinear

#: The ops qlinear implements natively (issue: foundation). Each backend case whose graph
#: is one of these ops must run with no fallback to onnx.reference.
NATIVE_OPS = frozenset(
    """Conv Gemm MatMul Add Sub Mul Div Pow Sqrt Relu Clip LeakyRelu Sigmoid HardSigmoid
    HardSwish Tanh Erf Gelu Softmax LayerNormalization BatchNormalization MaxPool AveragePool
    GlobalAveragePool Reshape Transpose Flatten Concat Split Slice Gather Squeeze Unsqueeze
    Shape Cast ReduceMean Where Expand Equal Constant ConstantOfShape Identity Sum Pad Resize
    QuantizeLinear DequantizeLinear DynamicQuantizeLinear QLinearConv QLinearMatMul
    ConvInteger MatMulInteger""".split()
)

#: Cases deliberately left to onnx.reference, each with its reason. Kept short and explicit.
FALLBACK_ALLOWED: dict[str, str] = {}


@lru_cache(maxsize=1)
def _cases() -> dict[str, object]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    return {
        c.name: c
        for c in cases
        if c.model is not None
        and len(c.model.graph.node) == 1
        and c.model.graph.node[0].op_type in NATIVE_OPS
        and c.model.graph.node[0].domain in ("", "ai.onnx")
    }


def _array(value: object) -> np.ndarray:
    """Cases give tensors as arrays, or as TensorProto for types numpy lacks (float8, int4)."""
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    return np.asarray(value)


def _case_names() -> list[str]:
    return sorted(_cases())


def test_every_native_op_has_backend_cases() -> None:
    covered = {c.model.graph.node[0].op_type for c in _cases().values()}
    assert covered == NATIVE_OPS


@pytest.mark.parametrize("name", _case_names())
def test_backend_node_case(name: str) -> None:
    case = _cases()[name]
    session = qlinear.Session(case.model, optimize=False)  # the op itself, not a rewrite
    if name not in FALLBACK_ALLOWED:
        assert session.fallback_ops == [], f"{name} fell back to onnx.reference"
    input_names = [i.name for i in case.model.graph.input]
    output_names = [o.name for o in case.model.graph.output]
    for inputs, expected in case.data_sets:
        feeds = dict(zip(input_names, map(_array, inputs), strict=False))
        got = session.run(output_names, feeds)
        for out_name, want, have in zip(output_names, expected, got, strict=True):
            want = _array(want)
            have = np.asarray(have)
            assert have.dtype == want.dtype, f"{out_name}: dtype {have.dtype} != {want.dtype}"
            assert have.shape == want.shape, f"{out_name}: shape {have.shape} != {want.shape}"
            if want.dtype.kind in "fcV":  # V: ml_dtypes' float8/bfloat16/float4
                np.testing.assert_allclose(
                    have.astype(np.float64),
                    want.astype(np.float64),
                    rtol=case.rtol,
                    atol=case.atol,
                    equal_nan=True,
                    err_msg=out_name,
                )
            elif want.dtype.kind in "OSU":
                assert have.tolist() == want.tolist(), out_name
            else:
                np.testing.assert_array_equal(have, want, err_msg=out_name)
