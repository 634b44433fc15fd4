"""DQ -> chain of elementwise float ops -> Q units become a 256-entry table lookup.

An 8-bit input takes only 256 values, so any elementwise function of it followed by
a per-tensor Q is a table: ``Q(f(DQ(x)))`` is evaluated once, at optimization time,
for every possible ``x``. The rewrite emits standard ONNX that onnxruntime also runs:

    x (u8/i8) -> Cast(int32) [-> Add(128) for int8] -> Gather(table[256], axis=0) -> y

Rules: the unit has one DequantizeLinear source (per-tensor, 8-bit), every op is one of
``ELEMENTWISE`` with other operands constant single values, every intermediate value
is read only inside the unit, and the end feeds only QuantizeLinear nodes with the
same per-tensor 8-bit parameters. Typical unit: the GELU of a quantized transformer,
``DQ -> Div -> Erf -> Add -> Mul(x) -> Mul -> Q``, five float passes replaced by one
lookup. The table is computed by qlinear's own runtime on the unit's own nodes, so the
result equals the QDQ graph's run in qlinear exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from qlinear.passes._infra import (
    QDQ,
    RulePass,
    add_initializer,
    const_array,
    consumers,
    new_node,
    only_q_consumer,
    read_qdq,
    record_replaces,
    redirect_qs,
)
from qlinear.quant import dequantize_affine, quantize_affine

#: Elementwise ops whose output element depends only on the same input element.
ELEMENTWISE = frozenset(
    """Add Sub Mul Div Pow Sqrt Exp Log Erf Tanh Sigmoid HardSigmoid HardSwish Relu Clip
    LeakyRelu Neg Abs Reciprocal Gelu Softplus Elu Selu Celu Mish""".split()
)
MAX_NODES = 16
_EIGHT_BIT = (np.dtype(np.uint8), np.dtype(np.int8))


class FuseTableLookupPass(RulePass):
    """Elementwise float chains between a DQ and a Q become a Gather from a 256-entry table."""

    anchors = frozenset({"QuantizeLinear"})

    def try_node(self, graph: ir.Graph, node: ir.Node) -> bool:
        q = read_qdq(node, "QuantizeLinear")
        if isinstance(q, str) or not q.per_tensor or q.dtype not in _EIGHT_BIT:
            return False
        end = node.inputs[0]
        if end is None or end.producer() is None:
            return False
        if isinstance(only_q_consumer(end), str):
            return False
        unit = _collect(end)
        if unit is None:
            return False
        source, nodes = unit
        table = _table(graph, source, nodes, end, q)
        if table is None:
            return False
        gather = emit_lookup(graph, node, source.node.inputs[0], source.dtype, table)
        record_replaces(gather, end.name)
        redirect_qs(graph, end, gather.outputs[0])
        return self.fired(node, "table lookup")


def emit_lookup(
    graph: ir.Graph, before: ir.Node, x: ir.Value, dtype: np.dtype, table: np.ndarray
) -> ir.Node:
    """x (8-bit) -> Cast(int32) [-> Add(128) for int8] -> Gather(table, axis=0); the Gather."""
    index = new_node(graph, before, "Cast", [x], {"to": onnx.TensorProto.INT32}).outputs[0]
    if np.dtype(dtype) == np.int8:
        offset = add_initializer(graph, np.array(128, np.int32), "lut_offset")
        index = new_node(graph, before, "Add", [index, offset]).outputs[0]
    values = add_initializer(graph, table, "lut")
    return new_node(graph, before, "Gather", [values, index], {"axis": 0})


def _collect(end: ir.Value) -> tuple[QDQ, list[ir.Node]] | None:
    """The DQ source and the elementwise nodes computing `end`, or None."""
    nodes: list[ir.Node] = []
    sources: set[ir.Node] = set()
    stack = [end]
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        producer = value.producer()
        if producer is None or id(producer) in seen:
            if producer is None:
                return None
            continue
        seen.add(id(producer))
        if producer.op_type == "DequantizeLinear" and producer.domain in ("", "ai.onnx"):
            sources.add(producer)
            continue
        if producer.domain not in ("", "ai.onnx") or producer.op_type not in ELEMENTWISE:
            return None
        nodes.append(producer)
        if len(nodes) > MAX_NODES:
            return None
        for operand in producer.inputs:
            if operand is None:
                continue
            constant = const_array(operand)
            if constant is not None:
                if constant.size != 1:
                    return None
                continue
            stack.append(operand)
    if not sources or not nodes:
        return None
    dqs = [read_qdq(n, "DequantizeLinear") for n in sources]
    dq = dqs[0]
    if isinstance(dq, str) or not dq.per_tensor or dq.dtype not in _EIGHT_BIT:
        return None
    for other in dqs[1:]:  # tools often give each consumer its own DQ of the same tensor
        if isinstance(other, str) or other.node.inputs[0] is not dq.node.inputs[0]:
            return None
        if not other.same_params(dq):
            return None
    inside = {id(n) for n in nodes}
    for n in nodes:
        for out in n.outputs:
            if out is end:
                continue
            if out.is_graph_output() or any(id(u) not in inside for u in consumers(out)):
                return None
    return dq, nodes  # any order: the table is evaluated by a Session, which sorts


def _source_outputs(nodes: list[ir.Node], source: QDQ) -> list[ir.Value]:
    """Every DequantizeLinear output of the source tensor that the unit reads."""
    x = source.node.inputs[0]
    found = []
    for node in nodes:
        for operand in node.inputs:
            producer = operand.producer() if operand is not None else None
            if producer is not None and producer.op_type == "DequantizeLinear":
                if producer.inputs[0] is x:
                    found.append(operand)
    return found


def _table(
    graph: ir.Graph, source: QDQ, nodes: list[ir.Node], end: ir.Value, q: QDQ
) -> np.ndarray | None:
    """Q(f(DQ(x))) for every x of the source's dtype, in index order (int8: x + 128)."""
    info = np.iinfo(source.dtype)
    codes = np.arange(info.min, info.max + 1).astype(source.dtype)
    floats = dequantize_affine(codes, source.params).astype(np.float32)
    result = evaluate_unit(graph, nodes, _source_outputs(nodes, source), floats, end)
    if result is None or result.shape != floats.shape or result.dtype != np.float32:
        return None
    return quantize_affine(result, q.params).reshape(-1)


def evaluate_unit(
    graph: ir.Graph,
    nodes: list[ir.Node],
    sources: list[ir.Value],
    x: np.ndarray,
    end: ir.Value,
) -> np.ndarray | None:
    """Run `nodes` (any order) in qlinear's own runtime with every value of `sources`
    fed `x` (1-D); `end`'s value, or None when the unit cannot be evaluated.

    Evaluating with the runtime that later runs the unfused graph is what makes a table
    exact: it holds the very numbers those kernels would compute.
    """
    from qlinear.runtime.session import Session

    names: dict[int, str] = {id(v): "x" for v in sources}
    for i, node in enumerate(nodes):  # name every output first: `nodes` is in any order
        for k, out in enumerate(node.outputs):
            names[id(out)] = f"v{i}_{k}"
    protos, inits = [], []
    for i, node in enumerate(nodes):
        proto = ir.serde.serialize_node(node)
        del proto.input[:]
        for j, operand in enumerate(node.inputs):
            if operand is None:
                proto.input.append("")
            elif id(operand) in names:
                proto.input.append(names[id(operand)])
            else:
                name = f"c{i}_{j}"
                inits.append(numpy_helper.from_array(const_array(operand), name))
                proto.input.append(name)
        del proto.output[:]
        proto.output.extend(names[id(out)] for out in node.outputs)
        protos.append(proto)
    elem = helper.np_dtype_to_tensor_dtype(x.dtype)
    opsets = [helper.make_opsetid("", graph.opset_imports.get("", 17))]
    opsets += [helper.make_opsetid(d, v) for d, v in graph.opset_imports.items() if d]
    model = helper.make_model(
        helper.make_graph(
            protos,
            "lut",
            [helper.make_tensor_value_info("x", elem, [x.size])],
            [helper.make_tensor_value_info(names[id(end)], onnx.TensorProto.UNDEFINED, None)],
            inits,
        ),
        opset_imports=opsets,
    )
    try:
        (result,) = Session(model, optimize=False).run(None, {"x": x})
    except Exception:  # noqa: BLE001 - a unit we cannot evaluate is simply not fused
        return None
    return np.asarray(result)
