"""DQ -> Conv/MatMul/Gemm -> Q node units become QLinearConv / QLinearMatMul / QGemm.

Rules (each refuses with a reason, see ``--explain``):

- ``DQ(x), DQ(w const) -> Conv [-> Relu|Clip] -> Q`` => ``QLinearConv``. The weight is
  per-tensor or per-channel on axis 0 (the output channel); the bias, float or a DQ of
  int32, becomes int32 quantized with ``x_scale * w_scale[n]`` and zero point 0 (an
  int32 bias already on that scale is taken as is). Relu/Clip is absorbed only when
  the output range already clamps there (Relu: ``y_zp == qmin``; Clip: ``Q(lo) <= qmin``
  and ``Q(hi) >= qmax``), so absorbing changes no value.
- ``DQ(a), DQ(b) -> MatMul [-> Relu|Clip] -> Q`` => ``QLinearMatMul`` (b per-tensor, or
  per-column on its last axis when 2-D; b may be an activation).
- ``DQ(a), DQ(b const) -> Gemm -> Q`` => ``com.microsoft.QGemm`` (bias int32 on
  ``a_scale * b_scale[n]``, alpha/beta folded into it).

Activations (x, a) are per-tensor uint8 or int8; weights int8 or uint8.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qlinear.passes._infra import (
    MS_DOMAIN,
    QDQ,
    RulePass,
    add_initializer,
    const_array,
    dq_of,
    ensure_opset,
    new_node,
    output_unit,
    record_replaces,
    redirect_qs,
    zero_point_value,
)
from qlinear.quant import QuantParams, bias_qparams, dequantize_affine, quantize_affine


def activation_input(node: ir.Node, index: int) -> QDQ | str:
    dq = dq_of(node.inputs[index] if len(node.inputs) > index else None)
    if isinstance(dq, str):
        return dq
    if not dq.per_tensor:
        return "activation DequantizeLinear is per-axis (needs per-tensor)"
    return dq


def weight_input(node: ir.Node, index: int, out_axis: int, *, const: bool = True) -> QDQ | str:
    """The DQ of a weight quantized per-tensor or per-channel along `out_axis` only."""
    dq = dq_of(node.inputs[index] if len(node.inputs) > index else None)
    if isinstance(dq, str):
        return f"weight: {dq}"
    if const and const_array(dq.node.inputs[0]) is None:
        return "weight is not a constant"
    if not dq.per_tensor and dq.axis != out_axis:
        return f"weight is per-axis on axis {dq.axis}, not the output-channel axis {out_axis}"
    return dq


def int32_bias(
    graph: ir.Graph, bias: ir.Value | None, qp: QuantParams, factor: float = 1.0
) -> ir.Value | str | None:
    """An int32 [n] bias with parameters `qp` (`bias_qparams`) for a float or DQ(int32) bias."""
    if bias is None:
        return None
    n = qp.scale.size
    dq = dq_of(bias, int32=True)
    arr: np.ndarray | None
    if not isinstance(dq, str):
        raw = const_array(dq.node.inputs[0])
        if raw is None:
            return "bias is not a constant"
        bias_scale = np.broadcast_to(dq.params.scale.reshape(-1), (n,)).astype(np.float32)
        want = qp.scale
        if (
            raw.dtype == np.int32
            and factor == 1.0
            and not np.any(dq.params.zero_point)
            and np.allclose(bias_scale, want, rtol=1e-6, atol=0)
            and raw.size == n
        ):
            return add_initializer(graph, raw.reshape(n).astype(np.int32), "bias_i32")
        arr = dequantize_affine(raw, dq.params)
    else:
        arr = const_array(bias)
        if arr is None:
            return "bias is neither a constant nor a DequantizeLinear of one"
    if arr.size not in (1, n):
        return f"bias of shape {arr.shape} is not per output channel"
    if not np.all(qp.scale >= np.finfo(np.float32).tiny):
        return "bias scale x_scale * w_scale is zero for some output channel"
    values = np.broadcast_to(arr.reshape(-1) * factor, (n,)).astype(np.float32)
    return add_initializer(graph, quantize_affine(values, qp), "bias_i32")


def _same_activation_dtype(x: QDQ, q: QDQ) -> str | None:
    if x.dtype != q.dtype:
        return f"input dtype {x.dtype} and output dtype {q.dtype} differ"
    return None


class FuseQLinearPass(RulePass):
    """DQ->Conv/MatMul/Gemm->Q units to QLinearConv, QLinearMatMul and QGemm."""

    anchors = frozenset({"Conv", "MatMul", "Gemm"})
    logged = anchors

    def try_node(self, graph: ir.Graph, node: ir.Node) -> bool:
        if node.op_type == "Conv":
            return self._try_conv(graph, node)
        if node.op_type == "MatMul":
            return self._try_matmul(graph, node)
        return self._try_gemm(graph, node)

    def _try_conv(self, graph: ir.Graph, node: ir.Node) -> bool:
        x = activation_input(node, 0)
        if isinstance(x, str):
            return self.refuse(node, x)
        w = weight_input(node, 1, 0)
        if isinstance(w, str):
            return self.refuse(node, w)
        unit = output_unit(node)
        if isinstance(unit, str):
            return self.refuse(node, unit)
        q, quantized = unit
        if not q.per_tensor:
            return self.refuse(node, "output QuantizeLinear is per-axis")
        why = _same_activation_dtype(x, q)
        if why:
            return self.refuse(node, why)
        n = const_array(w.node.inputs[0]).shape[0]
        qp = bias_qparams(x.scalar_scale, w.params.scale, n)
        bias = int32_bias(graph, node.inputs[2] if len(node.inputs) > 2 else None, qp)
        if isinstance(bias, str):
            return self.refuse(node, bias)
        inputs = [
            x.node.inputs[0],
            x.scale,
            zero_point_value(graph, x),
            w.node.inputs[0],
            w.scale,
            zero_point_value(graph, w),
            q.scale,
            zero_point_value(graph, q),
        ]
        if bias is not None:
            inputs.append(bias)
        attrs = {k: v for k, v in node.attributes.items()}
        fused = new_node(graph, node, "QLinearConv", inputs, attrs)
        record_replaces(fused, quantized.name)
        redirect_qs(graph, quantized, fused.outputs[0])
        return self.fired(node, "QLinearConv")

    def _try_matmul(self, graph: ir.Graph, node: ir.Node) -> bool:
        a = activation_input(node, 0)
        if isinstance(a, str):
            return self.refuse(node, a)
        b_rank = node.inputs[1].shape and len(node.inputs[1].shape)
        b = weight_input(node, 1, (b_rank or 2) - 1, const=False)
        if isinstance(b, str):
            return self.refuse(node, b)
        if not b.per_tensor and b_rank != 2:
            return self.refuse(node, "per-column B must be 2-D for QLinearMatMul")
        unit = output_unit(node)
        if isinstance(unit, str):
            return self.refuse(node, unit)
        q, quantized = unit
        if not q.per_tensor:
            return self.refuse(node, "output QuantizeLinear is per-axis")
        why = _same_activation_dtype(a, q)
        if why:
            return self.refuse(node, why)
        inputs = [
            a.node.inputs[0],
            a.scale,
            zero_point_value(graph, a),
            b.node.inputs[0],
            b.scale,
            zero_point_value(graph, b),
            q.scale,
            zero_point_value(graph, q),
        ]
        fused = new_node(graph, node, "QLinearMatMul", inputs)
        record_replaces(fused, quantized.name)
        redirect_qs(graph, quantized, fused.outputs[0])
        return self.fired(node, "QLinearMatMul")

    def _try_gemm(self, graph: ir.Graph, node: ir.Node) -> bool:
        gemm = gemm_operands(graph, node)
        if isinstance(gemm, str):
            return self.refuse(node, gemm)
        a, b, bias, attrs = gemm
        unit = output_unit(node)
        if isinstance(unit, str):
            return self.refuse(node, unit)
        q, quantized = unit
        if not q.per_tensor:
            return self.refuse(node, "output QuantizeLinear is per-axis")
        why = _same_activation_dtype(a, q)
        if why:
            return self.refuse(node, why)
        inputs = [
            a.node.inputs[0],
            a.scale,
            zero_point_value(graph, a),
            b.node.inputs[0],
            b.scale,
            zero_point_value(graph, b),
            bias,
            q.scale,
            zero_point_value(graph, q),
        ]
        fused = new_node(graph, node, "QGemm", inputs, attrs, domain=MS_DOMAIN)
        ensure_opset(graph, MS_DOMAIN, 1)
        record_replaces(fused, quantized.name)
        redirect_qs(graph, quantized, fused.outputs[0])
        return self.fired(node, "QGemm")


def gemm_operands(graph: ir.Graph, node: ir.Node) -> tuple[QDQ, QDQ, ir.Value | None, dict] | str:
    """(a, b, int32 bias, QGemm attributes) of a quantizable Gemm, or why not."""
    attrs = node.attributes
    trans_a = attrs["transA"].as_int() if "transA" in attrs else 0
    trans_b = attrs["transB"].as_int() if "transB" in attrs else 0
    alpha = attrs["alpha"].as_float() if "alpha" in attrs else 1.0
    beta = attrs["beta"].as_float() if "beta" in attrs else 1.0
    if trans_a:
        return "transA=1 is not supported"
    a = activation_input(node, 0)
    if isinstance(a, str):
        return a
    b = weight_input(node, 1, 0 if trans_b else 1)
    if isinstance(b, str):
        return b
    w = const_array(b.node.inputs[0])
    if w.ndim != 2:
        return "Gemm weight is not 2-D"
    n = w.shape[0] if trans_b else w.shape[1]
    qp = bias_qparams(a.scalar_scale, b.params.scale, n, alpha=alpha)
    bias_in = node.inputs[2] if len(node.inputs) > 2 else None
    bias = int32_bias(graph, bias_in, qp, factor=beta)
    if isinstance(bias, str):
        return bias
    return a, b, bias, {"transA": 0, "transB": int(trans_b), "alpha": float(alpha)}
