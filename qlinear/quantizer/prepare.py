"""Float pre-passes that make real exports quantizable; the caller's model is never touched.

In order: refuse already-quantized graphs, turn Constant nodes into initializers (so
weights held in Constant nodes are treated as weights), upgrade old opsets (11-12 to
13, the first with per-axis Q/DQ; to 21 when int4/int16/blocked Q/DQ is needed), fold
BatchNormalization into the preceding Conv, fold constant subgraphs (never
QuantizeLinear/DequantizeLinear), flatten Gemm biases [1, N] to [N], infer shapes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qlinear.errors import QlinearError

#: Ops whose presence means the model was quantized already.
QUANTIZED_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
    "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "QLinearAdd", "QLinearMul",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits",
}  # fmt: skip
_NO_FOLD = QUANTIZED_OPS | {
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
    "Multinomial", "Bernoulli", "Dropout", "If", "Loop", "Scan", "Constant",
}  # fmt: skip
#: Do not fold constants bigger than this many elements into new initializers
#: unless they replace a weight (e.g. a transposed weight).
_FOLD_LIMIT = 1 << 26


class AlreadyQuantizedError(QlinearError, ValueError):
    """The input has Q/DQ or integer ops: quantize the float model instead."""


def prepare(
    model: onnx.ModelProto, *, opset: int | None = None, fold_bn: bool = True
) -> onnx.ModelProto:
    """A float copy of `model` ready for calibration and Q/DQ insertion."""
    check_not_quantized(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    constants_to_initializers(out.graph)
    out = upgrade_opset(out, opset)
    if fold_bn:
        out = fold_batchnorm(out)
    fold_constants(out)
    flatten_gemm_bias(out.graph)
    remove_unused_initializers(out.graph)
    name_nodes(out.graph)
    return infer_shapes(out)


def name_nodes(graph: onnx.GraphProto) -> None:
    """Give every node a unique name: plans, exclusions and reports refer to nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def check_not_quantized(model: onnx.ModelProto) -> None:
    ops = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
    if ops:
        raise AlreadyQuantizedError(
            f"model is already quantized (it has {', '.join(ops)} nodes); quantize the "
            "float model instead"
        )


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


def upgrade_opset(model: onnx.ModelProto, target: int | None) -> onnx.ModelProto:
    """Convert to `target` (or to 13 when older); a newer model is left at its opset."""
    current = default_opset(model)
    want = max(current, 13, target or 0)
    if want == current:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, want)
    except Exception as exc:
        raise QlinearError(
            f"cannot upgrade the model from opset {current} to {want}: {exc}"
        ) from None
    converted.ir_version = max(converted.ir_version, _min_ir(want))
    return converted


def _min_ir(opset: int) -> int:
    return {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}.get(opset, 10)


def constants_to_initializers(graph: onnx.GraphProto) -> None:
    keep = []
    for node in graph.node:
        value = _constant_value(node) if node.op_type == "Constant" and not node.domain else None
        if value is None:
            keep.append(node)
            continue
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
    del graph.node[:]
    graph.node.extend(keep)


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, np.float32)
        if attr.name == "value_floats":
            return np.array(attr.floats, np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, np.int64)
        if attr.name == "value_ints":
            return np.array(attr.ints, np.int64)
    return None


def _inits(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                out.setdefault(name, []).append(node)
    return out


def _set_init(graph: onnx.GraphProto, name: str, value: np.ndarray) -> None:
    for i, t in enumerate(graph.initializer):
        if t.name == name:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
            return
    graph.initializer.append(numpy_helper.from_array(value, name))


def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Conv -> BatchNormalization folded by the graph optimizer's pass (one implementation)."""
    if not any(n.op_type == "BatchNormalization" for n in model.graph.node):
        return model
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from qlinear.passes.fold_batchnorm import FoldBatchNormPass

    ir_model = ir.serde.deserialize_model(model)
    if not FoldBatchNormPass()(ir_model).modified:
        return model
    RemoveUnusedNodesPass()(ir_model)
    return ir.serde.serialize_model(ir_model)


def fold_constants(model: onnx.ModelProto) -> int:
    """Evaluate nodes whose inputs are all initializers (Q/DQ and random ops excluded)."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    graph_outputs = {o.name for o in graph.output}
    opsets = {o.domain: o.version for o in model.opset_import}
    folded = 0
    changed = True
    while changed:
        changed = False
        inits = _inits(graph)
        for node in list(graph.node):
            if node.op_type in _NO_FOLD or node.domain not in ("", "ai.onnx"):
                continue
            if not node.input or not all(n == "" or n in inits for n in node.input):
                continue
            if any(o in graph_outputs for o in node.output):
                continue
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                   for a in node.attribute):  # fmt: skip
                continue
            feeds = {n: numpy_helper.to_array(inits[n]) for n in node.input if n}
            try:
                ref = ReferenceEvaluator(_single_node_model(node, feeds, opsets))
                results = ref.run(None, feeds)
            except Exception:
                continue
            if sum(np.size(r) for r in results) > _FOLD_LIMIT:
                continue
            for name, value in zip(node.output, results, strict=False):
                if name:
                    graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
            graph.node.remove(node)
            folded += 1
            changed = True
            break
    return folded


def _single_node_model(
    node: onnx.NodeProto, feeds: dict[str, np.ndarray], opsets: dict[str, int]
) -> onnx.ModelProto:
    inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
        for n, v in feeds.items()
    ]
    outputs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
    graph = helper.make_graph([node], "fold", inputs, outputs)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()]
    )


def flatten_gemm_bias(graph: onnx.GraphProto) -> None:
    """Gemm C of shape [1, N] is the same bias as [N]; the 1-D form can be quantized per-channel."""
    inits = _inits(graph)
    consumers = _consumers(graph)
    for node in graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in inits:
            continue
        c = numpy_helper.to_array(inits[node.input[2]])
        if c.ndim == 2 and c.shape[0] == 1 and len(consumers[node.input[2]]) == 1:
            _set_init(graph, node.input[2], c.reshape(-1))


def remove_unused_initializers(graph: onnx.GraphProto) -> None:
    """Drop initializers nothing reads (folded away), and their old-IR graph-input entries."""
    used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    dropped = {t.name for t in graph.initializer if t.name not in used}
    if not dropped:
        return
    keep = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inputs = [i for i in graph.input if i.name not in dropped]
    del graph.input[:]
    graph.input.extend(inputs)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:
        return model
