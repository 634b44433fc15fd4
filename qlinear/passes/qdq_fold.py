"""Q/DQ folding and integer data movement (all exact: no value changes).

Rules:

- ``DQ(p) -> Q(p)`` (identical parameters) cancels: users of the Q read the DQ's
  integer input. This also collapses ``Q -> DQ -> Q`` double pairs into one Q.
- ``DQ(p) -> Q(p')`` with different parameters is already one requantize and stays.
  (``Q -> DQ`` is the quantization of a float tensor and is not removable exactly.)
- ``DQ(p) -> op -> Q(p)`` for data-movement ops (Reshape, Transpose, Flatten, Squeeze,
  Unsqueeze, Slice, Gather, MaxPool, Identity, Expand, Split-free) => ``op`` runs on the
  integer tensor; Concat when every input and the output share one per-tensor ``p``.
  MaxPool is exact because dequantization is monotonic (scale > 0).
"""

from __future__ import annotations

import onnx_ir as ir

from qlinear.passes._infra import (
    QDQ,
    RulePass,
    consumers,
    dq_of,
    fresh_name,
    new_node,
    only_q_consumer,
    read_qdq,
    record_replaces,
    replace_output,
)

#: Ops that move or select values without arithmetic: data input 0, other inputs integer.
DATA_MOVEMENT = frozenset(
    {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather",
     "MaxPool", "Identity", "Expand", "DepthToSpace", "SpaceToDepth", "Tile"}
)  # fmt: skip


class CancelDQQPass(RulePass):
    """DQ -> Q with identical parameters is the identity on the integer tensor."""

    anchors = frozenset({"QuantizeLinear"})

    def try_node(self, graph: ir.Graph, node: ir.Node) -> bool:
        return self._try_cancel(graph, node)

    def _try_cancel(self, graph: ir.Graph, node: ir.Node) -> bool:
        dq = dq_of(node.inputs[0])
        if isinstance(dq, str):
            return False
        q = read_qdq(node, "QuantizeLinear")
        if isinstance(q, str) or not q.same_params(dq):
            return False
        source = dq.node.inputs[0]
        out = node.outputs[0]
        if out.is_graph_output() and (
            source.is_graph_input() or source.is_graph_output() or source.const_value is not None
        ):
            return False  # keep a node so the output keeps its own name
        replace_output(graph, out, source)
        return True


class IntegerDataMovementPass(RulePass):
    """Data-movement ops between DQ(p) and Q(p) run on the integer tensor."""

    anchors = DATA_MOVEMENT | {"Concat"}
    logged = frozenset({"MaxPool", "Concat", "Gather", "Reshape", "Transpose"})

    def try_node(self, graph: ir.Graph, node: ir.Node) -> bool:
        if node.op_type == "Concat":
            return self._try_concat(graph, node)
        return self._try_move(graph, node)

    def _try_move(self, graph: ir.Graph, node: ir.Node) -> bool:
        if not node.inputs or node.inputs[0] is None:
            return False
        dq = dq_of(node.inputs[0])
        if isinstance(dq, str):
            return self.refuse(node, dq)
        if node.op_type == "MaxPool" and (len(node.outputs) > 1 and node.outputs[1].uses()):
            return self.refuse(node, "MaxPool indices are used")
        if not dq.per_tensor and node.op_type != "Identity":
            return self.refuse(node, "per-axis parameters do not follow the moved data")
        q = only_q_consumer(node.outputs[0])
        if isinstance(q, str):
            return self.refuse(node, q)
        if not q.same_params(dq):
            if not (dq.per_tensor and q.per_tensor):
                return self.refuse(node, "QuantizeLinear after it has other per-axis parameters")
            return self._rebuild(graph, node, [dq.node.inputs[0], *node.inputs[1:]], dq, q)
        return self._rebuild(graph, node, [dq.node.inputs[0], *node.inputs[1:]])

    def _try_concat(self, graph: ir.Graph, node: ir.Node) -> bool:
        dqs = [dq_of(v) for v in node.inputs]
        bad = next((d for d in dqs if isinstance(d, str)), None)
        if bad is not None:
            return self.refuse(node, bad)
        if any(not d.per_tensor or not d.same_params(dqs[0]) for d in dqs):
            return self.refuse(node, "inputs have different quantization parameters")
        q = only_q_consumer(node.outputs[0])
        if isinstance(q, str):
            return self.refuse(node, q)
        if not q.same_params(dqs[0]):
            return self.refuse(node, "QuantizeLinear after it has other parameters")
        return self._rebuild(graph, node, [d.node.inputs[0] for d in dqs])

    def _rebuild(
        self,
        graph: ir.Graph,
        node: ir.Node,
        inputs: list,
        dq: QDQ | None = None,
        q: QDQ | None = None,
    ) -> bool:
        """`node` on the integer inputs; with dq/q, followed by the one requantize DQ->Q."""
        moved = ir.node(
            node.op_type,
            inputs,
            {k: v for k, v in node.attributes.items()},
            num_outputs=1,
            name=fresh_name(node.op_type),
        )
        moved.outputs[0].name = fresh_name(node.op_type)
        src = inputs[0]
        if src is not None and src.dtype is not None:
            moved.outputs[0].dtype = src.dtype
        graph.insert_before(node, moved)
        record_replaces(moved, node.outputs[0].name)
        result = moved.outputs[0]
        if dq is not None and q is not None:
            requant_dq = new_node(
                graph, node, "DequantizeLinear", [result, dq.scale, dq.zero_point]
            )
            requant_q = new_node(
                graph, node, "QuantizeLinear", [requant_dq.outputs[0], q.scale, q.zero_point]
            )
            result = requant_q.outputs[0]
        for q_node in consumers(node.outputs[0]):
            replace_output(graph, q_node.outputs[0], result)
        return self.fired(node, f"{node.op_type} on int8" + (" + requantize" if dq else ""))
