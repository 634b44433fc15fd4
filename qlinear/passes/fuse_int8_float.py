"""int8 inputs, float32 output: matrix products without an output quantization.

Rules:

- ``DQ(a), DQ(b) -> MatMul`` whose output stays float (last layers, feeds a float op)
  => ``com.microsoft.MatMulIntegerToFloat(a, b, a_scale, b_scale, a_zp, b_zp[, bias])``;
  a following ``Add`` of a constant ``[N]`` vector becomes its bias.
- ``DQ(a), DQ(b const) -> Gemm`` with float output => ``com.microsoft.QGemm`` without
  ``y_scale`` (float output, int32 bias).
- ``DynamicQuantizeLinear(x) -> MatMulInteger(., W, ., w_zp) -> Cast(float) -> Mul(s)
  [-> Add(bias)]`` where ``s == x_scale * w_scale`` => ``MatMulIntegerToFloat`` fed by
  the same DynamicQuantizeLinear.

Runs after `FuseQLinearPass`, so it only sees units whose output was not quantized.
A Conv with float output has no such operator in ONNX or com.microsoft: left float.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qlinear.passes._infra import (
    MS_DOMAIN,
    RulePass,
    const_array,
    consumers,
    ensure_opset,
    new_node,
    record_replaces,
    replace_output,
    single_op,
    zero_point_value,
)
from qlinear.passes.fuse_qlinear import activation_input, gemm_operands, weight_input


def _bias_add(value: ir.Value, n: int | None) -> tuple[ir.Node, ir.Value] | None:
    """The single `Add(value, const [N])` consuming value, and its constant input."""
    users = consumers(value)
    if len(users) != 1 or value.is_graph_output() or not single_op(users[0], "Add"):
        return None
    add = users[0]
    other = add.inputs[1] if add.inputs[0] is value else add.inputs[0]
    arr = const_array(other)
    if arr is None or arr.dtype != np.float32 or arr.ndim != 1 or (n and arr.shape[0] != n):
        return None
    return add, other


class FuseInt8FloatPass(RulePass):
    """Quantized-input matrix products with float output, static and dynamic."""

    anchors = frozenset({"MatMul", "Gemm", "MatMulInteger"})
    logged = frozenset({"MatMul", "Gemm"})

    def try_node(self, graph: ir.Graph, node: ir.Node) -> bool:
        if node.op_type == "MatMul":
            return self._try_matmul(graph, node)
        if node.op_type == "Gemm":
            return self._try_gemm(graph, node)
        return self._try_dynamic(graph, node)

    def _try_matmul(self, graph: ir.Graph, node: ir.Node) -> bool:
        a = activation_input(node, 0)
        if isinstance(a, str):
            return self.refuse(node, a)
        b_shape = node.inputs[1].shape
        b_rank = len(b_shape) if b_shape is not None else None
        b = weight_input(node, 1, (b_rank or 2) - 1, const=False)
        if isinstance(b, str):
            return self.refuse(node, b)
        if not b.per_tensor and b_rank != 2:
            return self.refuse(node, "per-column B must be 2-D")
        n = b_shape[-1] if b_shape is not None and isinstance(b_shape[-1], int) else None
        out = node.outputs[0]
        add = _bias_add(out, n)
        inputs = [
            a.node.inputs[0],
            b.node.inputs[0],
            a.scale,
            b.scale,
            zero_point_value(graph, a),
            zero_point_value(graph, b),
        ]
        if add is not None:
            inputs.append(add[1])
        fused = new_node(graph, node, "MatMulIntegerToFloat", inputs, domain=MS_DOMAIN)
        ensure_opset(graph, MS_DOMAIN, 1)
        replaced = add[0].outputs[0] if add is not None else out
        record_replaces(fused, replaced.name)
        replace_output(graph, replaced, fused.outputs[0])
        return self.fired(node, "MatMulIntegerToFloat" + (" + bias" if add else ""))

    def _try_gemm(self, graph: ir.Graph, node: ir.Node) -> bool:
        gemm = gemm_operands(graph, node)
        if isinstance(gemm, str):
            return self.refuse(node, gemm)
        a, b, bias, attrs = gemm
        inputs = [
            a.node.inputs[0],
            a.scale,
            zero_point_value(graph, a),
            b.node.inputs[0],
            b.scale,
            zero_point_value(graph, b),
            bias,
        ]
        fused = new_node(graph, node, "QGemm", inputs, attrs, domain=MS_DOMAIN)
        ensure_opset(graph, MS_DOMAIN, 1)
        record_replaces(fused, node.outputs[0].name)
        replace_output(graph, node.outputs[0], fused.outputs[0])
        return self.fired(node, "QGemm (float output)")

    def _try_dynamic(self, graph: ir.Graph, node: ir.Node) -> bool:
        inputs = list(node.inputs) + [None] * (4 - len(node.inputs))
        a, w, a_zp, w_zp = inputs
        dql = a.producer() if a is not None else None
        if not single_op(dql, "DynamicQuantizeLinear") or dql.outputs[0] is not a:
            return self.refuse(node, "A is not produced by DynamicQuantizeLinear")
        if a_zp is not dql.outputs[2]:
            return self.refuse(node, "A zero point is not DynamicQuantizeLinear's")
        weights = const_array(w)
        if weights is None or weights.ndim != 2:
            return self.refuse(node, "B is not a constant 2-D tensor")
        users = consumers(node.outputs[0])
        if len(users) != 1 or not single_op(users[0], "Cast"):
            return self.refuse(node, "MatMulInteger output does not go to one Cast")
        cast = users[0]
        if cast.attributes["to"].as_int() != ir.DataType.FLOAT.value:
            return self.refuse(node, "Cast is not to float32")
        users = consumers(cast.outputs[0])
        if len(users) != 1 or not single_op(users[0], "Mul"):
            return self.refuse(node, "Cast output does not go to one Mul")
        mul = users[0]
        scale_v = mul.inputs[1] if mul.inputs[0] is cast.outputs[0] else mul.inputs[0]
        w_scale = _weight_scale(scale_v, dql.outputs[1])
        if isinstance(w_scale, str):
            return self.refuse(node, w_scale)
        n = weights.shape[1]
        if w_scale.size not in (1, n):
            return self.refuse(node, "weight scale is not per-tensor or per-column")
        add = _bias_add(mul.outputs[0], n)
        last = add[0] if add is not None else mul
        w_scale_v = _const(graph, w_scale.reshape(-1) if w_scale.size > 1 else w_scale.reshape(()))
        fused_inputs = [a, w, dql.outputs[1], w_scale_v, a_zp]
        if w_zp is None:
            w_zp = _const(graph, np.zeros((), weights.dtype))
        fused_inputs.append(w_zp)
        if add is not None:
            fused_inputs.append(add[1])
        fused = new_node(graph, last, "MatMulIntegerToFloat", fused_inputs, domain=MS_DOMAIN)
        ensure_opset(graph, MS_DOMAIN, 1)
        record_replaces(fused, last.outputs[0].name)
        replace_output(graph, last.outputs[0], fused.outputs[0])
        return self.fired(node, "MatMulIntegerToFloat (dynamic)")


def _const(graph: ir.Graph, array: np.ndarray) -> ir.Value:
    from qlinear.passes._infra import add_initializer

    return add_initializer(graph, np.asarray(array), "const")


def _weight_scale(scale: ir.Value | None, a_scale: ir.Value) -> np.ndarray | str:
    """w_scale when `scale` is computed as Mul(a_scale, w_scale const), else why not."""
    node = scale.producer() if scale is not None else None
    if not single_op(node, "Mul"):
        return "output scale is not Mul(x_scale, w_scale)"
    x, y = node.inputs
    other = y if x is a_scale else x if y is a_scale else None
    arr = const_array(other)
    if other is None or arr is None:
        return "output scale is not DynamicQuantizeLinear's scale times a constant"
    return arr.astype(np.float32)
