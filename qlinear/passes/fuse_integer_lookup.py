"""Chains of 8-bit elementwise operators of one tensor become a single table lookup.

After the QLinear fusions a quantized GELU still costs several passes over the
widest tensor of a transformer: a table lookup for ``erf`` followed by
``QLinearAdd(+1)``, ``QLinearMul(x, .)`` and ``QLinearMul(0.5)``, because the QDQ
model quantizes the Add and the Muls between them. Every one of those nodes is an
elementwise function of the *same* 8-bit tensor ``x``, so the whole unit is a function
of 256 possible inputs: one ``Cast -> Gather`` from a table computed by running the
unit's own nodes on every code (exact by construction, as in `fuse_table_lookup`).

A unit grows backwards from its end through nodes whose every non-constant input is
inside the unit or the source, whose constants are single values, and whose outputs
are read only inside the unit. It is rewritten only when it replaces at least two
passes over the tensor (a lone ``QLinearAdd`` with a constant is already one pass).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir import passes

from qlinear.passes._infra import (
    MS_DOMAIN,
    REPLACES_KEY,
    ExplainLog,
    const_array,
    consumers,
    record_replaces,
    replace_output,
    tensor_dtype,
)
from qlinear.passes.fuse_table_lookup import ELEMENTWISE, emit_lookup, evaluate_unit

_EIGHT_BIT = (np.dtype(np.uint8), np.dtype(np.int8))
#: com.microsoft operators that are elementwise in their non-constant inputs.
_MS_ELEMENTWISE = frozenset({"QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu"})
#: Default-domain operators that are elementwise (data movement of one element).
_ONNX_ELEMENTWISE = ELEMENTWISE | {"Cast", "QuantizeLinear", "DequantizeLinear"}
MAX_NODES = 24


class FuseIntegerLookupPass(passes.InPlacePass):
    """Elementwise 8-bit chains of one source tensor become one Cast -> Gather lookup."""

    def __init__(self, log: ExplainLog | None = None) -> None:
        super().__init__()
        self.log = log

    def call(self, model: ir.Model) -> passes.PassResult:
        graph = model.graph
        modified = False
        taken: set[int] = set()
        for node in reversed(list(graph)):  # consumers first: each unit is maximal
            if id(node) in taken or node.graph is not graph or not _elementwise(node):
                continue
            unit = _collect(node)
            if unit is None:
                continue
            source, nodes = unit
            if _cost(nodes) < 2:
                continue
            end = node.outputs[0]
            dtype = tensor_dtype(source)
            info = np.iinfo(dtype)
            codes = np.arange(info.min, info.max + 1).astype(dtype)
            table = evaluate_unit(graph, nodes, [source], codes, end)
            if table is None or table.shape != codes.shape or table.dtype not in _EIGHT_BIT:
                continue
            gather = emit_lookup(graph, node, source, dtype, table)
            gather.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(table.dtype))
            replaces = node.meta.get(REPLACES_KEY) or node.metadata_props.get(REPLACES_KEY)
            record_replaces(gather, replaces or end.name)
            replace_output(graph, end, gather.outputs[0])
            taken.update(id(n) for n in nodes)
            modified = True
            if self.log is not None:
                self.log.fired(node, f"{type(self).__name__}: {len(nodes)} nodes -> lookup")
        return passes.PassResult(model, modified)


def _elementwise(node: ir.Node) -> bool:
    if node.domain == MS_DOMAIN:
        return node.op_type in _MS_ELEMENTWISE
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Gather":  # a lookup: constant 1-D table, computed indices
        table = const_array(node.inputs[0])
        return table is not None and table.ndim == 1 and const_array(node.inputs[1]) is None
    return node.op_type in _ONNX_ELEMENTWISE


def _operands(node: ir.Node) -> list[ir.Value] | None:
    """The node's non-constant inputs, or None if a constant is not a single value."""
    out = []
    for i, value in enumerate(node.inputs):
        if value is None:
            continue
        if node.op_type == "Gather" and i == 0:
            continue  # the table
        constant = const_array(value)
        if constant is None:
            out.append(value)
        elif constant.size != 1 or constant.ndim > 1:
            return None  # a per-channel operand: not a function of one element
    return out


def _collect(end_node: ir.Node) -> tuple[ir.Value, list[ir.Node]] | None:
    """(source, nodes) of the largest unit ending at end_node with one 8-bit source."""
    barrier: set[int] = set()  # values that must stay inputs of the unit
    for _ in range(MAX_NODES):
        nodes: dict[int, ir.Node] = {}
        leaves: dict[int, ir.Value] = {}
        stack = [end_node]
        while stack:
            node = stack.pop()
            if id(node) in nodes:
                continue
            operands = _operands(node)
            if operands is None or len(nodes) >= MAX_NODES:
                return None
            nodes[id(node)] = node
            for value in operands:
                producer = value.producer()
                if (
                    producer is None
                    or id(value) in barrier
                    or producer.graph is not end_node.graph
                    or not _elementwise(producer)
                    or _operands(producer) is None
                ):
                    leaves[id(value)] = value
                else:
                    stack.append(producer)
        # an inside value read outside the unit must be computed anyway: make it a leaf
        escaping = [
            out
            for n in nodes.values()
            if n is not end_node
            for out in n.outputs
            if out.is_graph_output() or any(id(u) not in nodes for u in consumers(out))
        ]
        # a float (or untyped) leaf: the unit grew past the 8-bit tensor (into the
        # QuantizeLinear that made it); stop at the outputs of the nodes that read it
        wide = {id(v) for v in leaves.values() if tensor_dtype(v) not in _EIGHT_BIT}
        escaping += [
            out
            for n in nodes.values()
            if n is not end_node and any(v is not None and id(v) in wide for v in n.inputs)
            for out in n.outputs
        ]
        if not escaping:
            if len(leaves) != 1 or len(end_node.outputs) != 1:
                return None
            (source,) = leaves.values()
            if id(source) in wide:
                return None
            return source, list(nodes.values())
        if all(id(v) in barrier for v in escaping):
            return None
        barrier.update(id(v) for v in escaping)
    return None


#: Nodes not counted as passes: a Cast/Add feeding a lookup is planned into the lookup,
#: and a bare DQ -> Q pair is the requantize the Q/DQ folds deliberately leave.
_FREE = frozenset({"Cast", "Add", "QuantizeLinear", "DequantizeLinear"})


def _cost(nodes: list[ir.Node]) -> int:
    """Passes over the tensor the unit costs now."""
    return sum(1 for n in nodes if n.op_type not in _FREE or n.domain == MS_DOMAIN)
