"""DQ -> elementwise/pooling op -> Q units become com.microsoft QLinear* operators.

Rules (every quantized operand and the output per-tensor, one 8-bit dtype):

- ``Add``, ``Mul`` (numpy broadcasting) => ``QLinearAdd``, ``QLinearMul``
- ``Concat`` with different input parameters => ``QLinearConcat`` (shared parameters
  are handled exactly by the integer data-movement pass first)
- ``AveragePool``, ``GlobalAveragePool`` (NCHW) => ``QLinearAveragePool``,
  ``QLinearGlobalAveragePool``
- ``Sigmoid``, ``LeakyRelu`` => ``QLinearSigmoid``, ``QLinearLeakyRelu``
- ``Softmax`` (opset >= 13) => ``QLinearSoftmax``

A Relu/Clip between the op and its Q is absorbed when the output range already
clamps there (see ``output_unit``), e.g. a residual ``Add -> Relu -> Q``.
"""

from __future__ import annotations

import onnx_ir as ir

from qlinear.passes._infra import (
    MS_DOMAIN,
    QDQ,
    RulePass,
    dq_of,
    ensure_opset,
    new_node,
    output_unit,
    record_replaces,
    redirect_qs,
    zero_point_value,
)

_UNARY = {
    "AveragePool": "QLinearAveragePool",
    "GlobalAveragePool": "QLinearGlobalAveragePool",
    "Sigmoid": "QLinearSigmoid",
    "LeakyRelu": "QLinearLeakyRelu",
    "Softmax": "QLinearSoftmax",
}
_BINARY = {"Add": "QLinearAdd", "Mul": "QLinearMul"}


class FuseQLinearElementwisePass(RulePass):
    """Add/Mul/Concat/pooling/Sigmoid/LeakyRelu/Softmax units to com.microsoft QLinear*."""

    anchors = frozenset(_UNARY) | frozenset(_BINARY) | {"Concat"}
    logged = anchors

    def try_node(self, graph: ir.Graph, node: ir.Node) -> bool:
        operands = self._operands(node)
        if isinstance(operands, str):
            return self.refuse(node, operands)
        unit = output_unit(node)
        if isinstance(unit, str):
            return self.refuse(node, unit)
        q, quantized = unit
        if not q.per_tensor:
            return self.refuse(node, "output QuantizeLinear is per-axis")
        if any(d.dtype != q.dtype for d in operands):
            return self.refuse(node, "operand and output dtypes differ (uint8 vs int8)")
        if node.op_type in _BINARY:
            return self._try_binary(graph, node, operands, q, quantized)
        if node.op_type == "Concat":
            return self._try_concat(graph, node, operands, q, quantized)
        return self._try_unary(graph, node, operands[0], q, quantized)

    def _operands(self, node: ir.Node) -> list[QDQ] | str:
        n = len(node.inputs) if node.op_type in ("Concat", *_BINARY) else 1
        out = []
        for value in node.inputs[:n]:
            dq = dq_of(value)
            if isinstance(dq, str):
                return dq
            if not dq.per_tensor:
                return "an operand's DequantizeLinear is per-axis"
            out.append(dq)
        return out

    def _try_binary(
        self, graph: ir.Graph, node: ir.Node, ops: list[QDQ], q: QDQ, quantized: ir.Value
    ) -> bool:
        a, b = ops
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
        return self._emit(graph, node, _BINARY[node.op_type], inputs, {}, quantized)

    def _try_concat(
        self, graph: ir.Graph, node: ir.Node, ops: list[QDQ], q: QDQ, quantized: ir.Value
    ) -> bool:
        inputs = [q.scale, zero_point_value(graph, q)]
        for d in ops:
            inputs += [d.node.inputs[0], d.scale, zero_point_value(graph, d)]
        axis = node.attributes["axis"].as_int()
        return self._emit(graph, node, "QLinearConcat", inputs, {"axis": axis}, quantized)

    def _try_unary(
        self, graph: ir.Graph, node: ir.Node, x: QDQ, q: QDQ, quantized: ir.Value
    ) -> bool:
        attrs = {k: v for k, v in node.attributes.items()}
        op = node.op_type
        shape = node.inputs[0].shape or x.node.inputs[0].shape
        rank = len(shape) if shape is not None else None
        if op in ("AveragePool", "GlobalAveragePool"):
            if rank != 4:
                return self.refuse(node, f"{op} input is not a known rank-4 NCHW tensor")
            if op == "AveragePool" and "dilations" in attrs:
                if any(d != 1 for d in attrs.pop("dilations").as_ints()):
                    return self.refuse(node, "dilated AveragePool")
            attrs["channels_last"] = 0
        if op == "LeakyRelu":
            attrs.setdefault("alpha", ir.AttrFloat32("alpha", 0.01))
        if op == "Softmax":
            opset = graph.opset_imports.get("", 13)
            if opset < 13:
                return self.refuse(node, "Softmax before opset 13 (2-D coercion)")
            attrs = {"axis": attrs["axis"].as_int() if "axis" in attrs else -1, "opset": opset}
        inputs = [
            x.node.inputs[0],
            x.scale,
            zero_point_value(graph, x),
            q.scale,
            zero_point_value(graph, q),
        ]
        return self._emit(graph, node, _UNARY[op], inputs, attrs, quantized)

    def _emit(
        self,
        graph: ir.Graph,
        node: ir.Node,
        op: str,
        inputs: list,
        attrs: dict,
        quantized: ir.Value,
    ) -> bool:
        """Replace the unit; `quantized` is the value its Q read (after any absorbed Relu)."""
        fused = new_node(graph, node, op, inputs, attrs, domain=MS_DOMAIN)
        ensure_opset(graph, MS_DOMAIN, 1)
        record_replaces(fused, quantized.name)
        redirect_qs(graph, quantized, fused.outputs[0])
        return self.fired(node, op)
