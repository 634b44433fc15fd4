"""Dynamic quantization: weights quantized ahead, activations per call.

MatMul/Gemm/Conv with a constant weight get a weight DequantizeLinear (per config) and
their activation input goes through DynamicQuantizeLinear -> DequantizeLinear (uint8,
per-tensor, scale from the call's own min/max). With ``dynamic_per_token`` the
MatMul activations are quantized per row instead (symmetric int8, one scale per token:
ReduceMax(|x|) / 127 -> opset-21 blocked QuantizeLinear/DequantizeLinear along the
last axis), which keeps outlier tokens from costing the others their precision.
No calibration data is read.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from qlinear.quantizer.plan import GraphIndex, Plan, linear_weight
from qlinear.quantizer.static import (
    Emitter,
    WeightOptions,
    _emit_const,
    _safe,
    splice,
    weight_params,
)

_DYNAMIC_OPS = ("MatMul", "Gemm", "Conv")


def quantize_dynamic(
    model: onnx.ModelProto, config: object, opts: WeightOptions
) -> onnx.ModelProto:
    """A new model with dynamic activation quantization in front of each linear op."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = GraphIndex(out)
    em = Emitter(out)
    exclude_nodes = set(getattr(config, "exclude_nodes", ()))
    exclude_ops = set(getattr(config, "exclude_op_types", ()))
    keep_float = set(getattr(config, "keep_float_tensors", ()))
    per_token = bool(getattr(config, "dynamic_per_token", False))
    plan = Plan()
    act_nodes: dict[str, list[tuple[str, int]]] = {}
    k_of: dict[str, int] = {}
    for node in index.nodes:
        if node.op_type not in _DYNAMIC_OPS or node.name in exclude_nodes:
            continue
        if node.op_type in exclude_ops:
            continue
        w = linear_weight(index, node)
        x = node.input[0]
        if w is None or not index.activation(x) or x in keep_float:
            continue
        if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
            continue
        i, spec = w
        plan.weights.setdefault(node.input[i], spec)
        plan.weight_uses.add((node.name, i))
        act_nodes.setdefault(x, []).append((node.name, 0))
        if node.op_type == "MatMul":
            k_of[x] = int(index.array(node.input[1]).shape[-2])

    inserted: dict[str, list[onnx.NodeProto]] = {}
    weight_dq = {
        name: _emit_const(
            em, name, index.array(name), weight_params(index.array(name), spec, opts), inserted
        )  # fmt: skip
        for name, spec in plan.weights.items()
    }
    graph_inputs = {i.name for i in out.graph.input}
    act_dq: dict[str, str] = {}
    for x, uses in act_nodes.items():
        only_matmul = all(_op(index, n) == "MatMul" for n, _ in uses)
        if per_token and only_matmul and x in k_of:
            nodes, dq = _per_token(em, x, k_of[x])
        else:
            nodes, dq = _per_tensor(em, x)
        key = "" if x in graph_inputs or x not in index.producer else x
        inserted.setdefault(key, []).extend(nodes)
        act_dq[x] = dq
    uses_all = {u for us in act_nodes.values() for u in us}
    for node in out.graph.node:
        for i, name in enumerate(node.input):
            if (node.name, i) in uses_all and name in act_dq:
                node.input[i] = act_dq[name]
            elif (node.name, i) in plan.weight_uses and name in weight_dq:
                node.input[i] = weight_dq[name]
    splice(out.graph, inserted, em.new_inits)
    return out


def _op(index: GraphIndex, node_name: str) -> str:
    return next(n.op_type for n in index.nodes if n.name == node_name)


def _per_tensor(em: Emitter, x: str) -> tuple[list[onnx.NodeProto], str]:
    base = _safe(x)
    q, s, z, dq = (em.fresh(base + suffix) for suffix in
                   ("_quantized", "_scale", "_zero_point", "_dequantized"))  # fmt: skip
    return [
        helper.make_node("DynamicQuantizeLinear", [x], [q, s, z],
                         name=em.fresh(base + "_DynamicQuantizeLinear")),
        helper.make_node("DequantizeLinear", [q, s, z], [dq],
                         name=em.fresh(base + "_DequantizeLinear")),
    ], dq  # fmt: skip


def _per_token(em: Emitter, x: str, k: int) -> tuple[list[onnx.NodeProto], str]:
    base = _safe(x)
    axes = em.init(base + "_axes", np.array([-1], np.int64))
    qmax = em.init(base + "_qmax", np.array(127, np.float32))
    tiny = em.init(base + "_tiny", np.array(np.finfo(np.float32).tiny, np.float32))
    suffixes = ("_abs", "_absmax", "_scale0", "_scale", "_quantized", "_dequantized")
    a, m, s0, s, q, dq = (em.fresh(base + sfx) for sfx in suffixes)
    return [
        helper.make_node("Abs", [x], [a], name=em.fresh(base + "_Abs")),
        helper.make_node("ReduceMax", [a, axes], [m], keepdims=1,
                         name=em.fresh(base + "_ReduceMax")),
        helper.make_node("Div", [m, qmax], [s0], name=em.fresh(base + "_Div")),
        helper.make_node("Max", [s0, tiny], [s], name=em.fresh(base + "_Max")),
        helper.make_node("QuantizeLinear", [x, s], [q], axis=-1, block_size=k,
                         output_dtype=TensorProto.INT8, name=em.fresh(base + "_QuantizeLinear")),
        helper.make_node("DequantizeLinear", [q, s], [dq], axis=-1, block_size=k,
                         name=em.fresh(base + "_DequantizeLinear")),
    ], dq  # fmt: skip
