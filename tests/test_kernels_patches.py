"""Patch convolutions (stride == kernel, no pads: ViT's patch embedding) run as one GEMM.

Held bit-exactly to onnxruntime's QLinearConv (NCHW) and to qlinear's implicit-GEMM
convolution, in both layouts, with distinct per-channel weight zero points.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from qlinear import Session
from qlinear.runtime.kernels.patches import is_patchify

MS = "com.microsoft"


def _model(node, x: np.ndarray, consts: dict):
    et = helper.np_dtype_to_tensor_dtype(x.dtype)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", et, x.shape)],
        [helper.make_tensor_value_info("y", et, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets)


def test_only_disjoint_unpadded_patches_qualify():
    assert is_patchify((16, 16), (16, 16), (1, 1), (0, 0), (0, 0), 1, (224, 224))
    assert not is_patchify((3, 3), (1, 1), (1, 1), (1, 1), (1, 1), 1, (8, 8))
    assert not is_patchify((4, 4), (4, 4), (1, 1), (1, 0), (0, 0), 1, (8, 8))  # padded
    assert not is_patchify((4, 4), (4, 4), (1, 1), (0, 0), (0, 0), 2, (8, 8))  # grouped
    assert not is_patchify((4, 4), (4, 4), (1, 1), (0, 0), (0, 0), 1, (10, 8))  # ragged


@settings(max_examples=25, deadline=None)
@given(
    c_in=st.integers(1, 6),
    c_out=st.integers(1, 70),
    kh=st.integers(2, 8),
    kw=st.integers(2, 8),
    ph=st.integers(1, 4),
    pw=st.integers(1, 4),
    batch=st.integers(1, 2),
    signed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_patch_convolution_equals_onnxruntime_in_both_layouts(
    c_in, c_out, kh, kw, ph, pw, batch, signed, seed
):
    rng = np.random.default_rng(seed)
    dtype = np.int8 if signed else np.uint8
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max + 1, (batch, c_in, ph * kh, pw * kw)).astype(dtype)
    consts = {
        "xs": np.float32(0.05), "xz": np.array(rng.integers(info.min, info.max + 1), dtype),
        "w": rng.integers(-128, 128, (c_out, c_in, kh, kw)).astype(np.int8),
        "ws": rng.uniform(0.0005, 0.01, c_out).astype(np.float32),
        "wz": rng.integers(-4, 5, c_out).astype(np.int8),  # distinct per channel
        "ys": np.float32(rng.uniform(0.05, 2.0)),
        "yz": np.array(rng.integers(info.min, info.max + 1), dtype),
        "b": rng.integers(-3000, 3000, c_out).astype(np.int32),
    }
    ins = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"]
    attrs = dict(kernel_shape=[kh, kw], strides=[kh, kw], pads=[0, 0, 0, 0])
    nchw = _model(helper.make_node("QLinearConv", ins, ["y"], **attrs), x, consts)
    ours = Session(nchw, optimize=False).run(None, {"x": x})[0]
    if not signed:  # ORT's QLinearConv refuses int8 activations with per-channel w_zp != 0
        ref = ort.InferenceSession(nchw.SerializeToString(),
                                   providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_array_equal(ours, ref)
    # the implicit-GEMM convolution (patch path off: a 1-pixel pad then a crop is not
    # a patch tiling) gives the same numbers
    padded = dict(attrs, pads=[0, 0, kh, kw])
    general = _model(helper.make_node("QLinearConv", ins, ["y"], **padded), x, consts)
    ref2 = Session(general, optimize=False).run(None, {"x": x})[0][:, :, :ph, :pw]
    np.testing.assert_array_equal(ours, ref2)
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    nhwc = _model(helper.make_node("QLinearConv", ins, ["y"], domain=MS, channels_last=1,
                                   **attrs), x_nhwc, consts)
    ours_nhwc = Session(nhwc, optimize=False).run(None, {"x": x_nhwc})[0]
    np.testing.assert_array_equal(ours_nhwc, ours.transpose(0, 2, 3, 1))


def test_patch_path_is_taken_for_a_vit_stem(monkeypatch):
    from qlinear.runtime.kernels import patches

    calls = []
    original = patches.gemm
    monkeypatch.setattr(patches, "gemm", lambda *a, **k: calls.append(1) or original(*a, **k))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1, 3, 32, 32)).astype(np.uint8)
    consts = {"xs": np.float32(0.02), "xz": np.uint8(3),
              "w": rng.integers(-128, 128, (8, 3, 16, 16)).astype(np.int8),
              "ws": np.float32(0.01), "wz": np.int8(0), "ys": np.float32(0.5), "yz": np.uint8(9)}
    node = helper.make_node("QLinearConv", ["x", *consts], ["y"], kernel_shape=[16, 16],
                            strides=[16, 16])
    (y,) = Session(_model(node, x, consts), optimize=False).run(None, {"x": x})
    assert calls and y.shape == (1, 8, 2, 2)
