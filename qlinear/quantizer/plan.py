"""Which tensors get quantized, and how: a structural plan over the float graph.

Rules (by op type, never by name):
- compute ops quantize their float activation inputs and constant weights
  (Conv, ConvTranspose, MatMul incl. activation x activation, Gemm, Add, Mul, Concat,
  AveragePool, GlobalAveragePool, Sigmoid, Softmax; Gather quantizes a constant table);
- data-movement ops (Reshape, Transpose, MaxPool, Resize, Slice, Gather, ...) are
  quantized when a quantized consumer wants their output, and share their input's
  parameters, so they can later run on integers directly;
- Relu/Clip are never quantized nodes: their output is quantized for the consumer,
  the tensor between Conv and Relu is not, so the activation is absorbed into the
  output range (exact for asymmetric activations, whose zero point is then qmin);
- tensors with mask sentinels (|x| >= 1e30, e.g. float32-lowest attention masks),
  additive masks derived from integer inputs (see `additive_mask_tensors`), tensors
  with no finite values or listed in ``keep_float_tensors`` stay float, and so does
  every compute node reading one (the mask arithmetic runs in float);
- Add/Mul with a constant operand stay float unless ``quantize_constant_operands``
  (a bias add after MatMul is then an exact float bias);
- with ``float_residual_adds``, an Add read by a layer norm (LayerNormalization, or the
  ReduceMean of a decomposed one) stays float: that is the transformer residual stream,
  whose outlier channels make it the most quantization-sensitive tensor in the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

COMPUTE_OPS = {
    "Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "Concat", "AveragePool",
    "GlobalAveragePool", "Sigmoid", "Softmax",
}  # fmt: skip
LINEAR_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm"}
_NORMS = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
          "ReduceMean"}  # fmt: skip
#: op type -> indices of the data input(s) that carry values through unchanged.
DATA_MOVEMENT = {
    "Reshape": (0,), "Transpose": (0,), "Flatten": (0,), "Squeeze": (0,), "Unsqueeze": (0,),
    "Slice": (0,), "MaxPool": (0,), "Resize": (0,), "Identity": (0,), "Split": (0,),
    "Expand": (0,), "Tile": (0,), "DepthToSpace": (0,), "SpaceToDepth": (0,), "Gather": (0,),
}  # fmt: skip


@dataclass(frozen=True)
class WeightSpec:
    """How to quantize one constant: channel axis (None: per-tensor) and reduction axis."""

    axis: int | None
    reduce_axis: int | None
    as_activation: bool = False  # constant operand of Add/Mul/Concat: activation dtype


@dataclass
class Plan:
    """The result of planning: node names quantized, tensors and their parameter groups."""

    nodes: list[str] = field(default_factory=list)
    #: activation tensor -> the tensor whose statistics give its parameters (group root)
    activations: dict[str, str] = field(default_factory=dict)
    #: (consumer node name, input index) pairs that read the dequantized activation
    act_uses: set[tuple[str, int]] = field(default_factory=set)
    #: weight initializer -> spec; (node, index) uses that read the dequantized weight
    weights: dict[str, WeightSpec] = field(default_factory=dict)
    weight_uses: set[tuple[str, int]] = field(default_factory=set)
    #: bias initializer -> (activation tensor, weight initializer, node name)
    biases: dict[str, tuple[str, str, str]] = field(default_factory=dict)


class GraphIndex:
    """Producers, consumers, constants and float-ness of values in one graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.graph = graph
        self.nodes = list(graph.node)
        self.consts = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for name in n.input:
                if name:
                    self.consumers.setdefault(name, []).append(n)
        self.outputs = {o.name for o in graph.output}
        self.elem: dict[str, int] = {}
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            if vi.type.HasField("tensor_type"):
                self.elem[vi.name] = vi.type.tensor_type.elem_type
        for t in graph.initializer:
            self.elem[t.name] = t.data_type
        self._arrays: dict[str, np.ndarray] = {}

    def is_float(self, name: str) -> bool:
        return self.elem.get(name) == onnx.TensorProto.FLOAT

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.consts[name])
        return self._arrays[name]

    def activation(self, name: str) -> bool:
        return bool(name) and not self.is_const(name) and self.is_float(name)


def _attr(node: onnx.NodeProto, name: str, default: int | float) -> int | float:
    for a in node.attribute:
        if a.name == name:
            return a.i if a.type == onnx.AttributeProto.INT else a.f
    return default


def additive_mask_tensors(index: GraphIndex) -> set[str]:
    """Float tensors computed from integer/bool inputs only (attention masks turned into
    additive biases, e.g. (1 - mask) * -10000), and what Add/Sub/Where/data movement
    carry them into, up to the Softmax that consumes them ("data" is anything computed
    from a float input or a non-scalar float constant such as an embedding table).
    Their range is set by the mask constant, not by the data, so they stay float
    whatever the magnitude."""
    graph_inputs = {i.name for i in index.graph.input if i.name not in index.consts}
    # "data" flows from float inputs and from float tables/weights (an embedding Gather
    # turns integer ids into data); masks use integer inputs and scalar constants only.
    from_float: dict[str, bool] = {n: index.is_float(n) for n in graph_inputs}
    for name, t in index.consts.items():
        size = int(np.prod(t.dims)) if len(t.dims) else 1
        from_float[name] = index.is_float(name) and size > 1
    from_input: dict[str, bool] = dict.fromkeys(graph_inputs, True)
    tainted: set[str] = set()
    for node in index.nodes:
        ins = [n for n in node.input if n]
        f = any(from_float.get(n, False) for n in ins)
        i = any(from_input.get(n, False) for n in ins)
        carries = node.op_type in ("Add", "Sub", "Where", "Mul") or node.op_type in DATA_MOVEMENT
        hot = carries and any(n in tainted for n in ins)
        for o in node.output:
            if not o:
                continue
            from_float[o], from_input[o] = f, i
            if index.is_float(o) and ((i and not f) or hot):
                tainted.add(o)
    return tainted


def candidate_tensors(index: GraphIndex) -> list[str]:
    """Every float activation a plan could quantize (calibrate these once)."""
    names: dict[str, None] = {}
    for node in index.nodes:
        if node.op_type in COMPUTE_OPS or node.op_type in DATA_MOVEMENT:
            for name in node.input:
                if index.activation(name):
                    names[name] = None
    return list(names)


def linear_weight(index: GraphIndex, node: onnx.NodeProto) -> tuple[int, WeightSpec] | None:
    """(input index, spec) of the constant weight of a Conv/ConvTranspose/MatMul/Gemm."""
    op = node.op_type
    if op == "Conv" and len(node.input) > 1 and index.is_const(node.input[1]):
        return 1, WeightSpec(axis=0, reduce_axis=1)
    if op == "ConvTranspose" and len(node.input) > 1 and index.is_const(node.input[1]):
        axis = 1 if _attr(node, "group", 1) == 1 else None
        return 1, WeightSpec(axis=axis, reduce_axis=0)
    if op == "MatMul" and index.is_const(node.input[1]):
        rank = index.array(node.input[1]).ndim
        if rank >= 2:
            return 1, WeightSpec(axis=rank - 1, reduce_axis=rank - 2)
        return 1, WeightSpec(axis=None, reduce_axis=None)
    if op == "Gemm" and index.is_const(node.input[1]):
        trans_b = _attr(node, "transB", 0)
        return 1, WeightSpec(axis=0 if trans_b else 1, reduce_axis=1 if trans_b else 0)
    return None


def make_plan(
    index: GraphIndex,
    *,
    excluded: Callable[[onnx.NodeProto], bool],
    float_tensor: Callable[[str], bool],
    quantize_constant_operands: bool = False,
    float_residual_adds: bool = False,
    only_nodes: Iterable[str] | None = None,
) -> Plan:
    """Plan Q/DQ placement. `float_tensor(name)` says a tensor must stay float."""
    plan = Plan()
    only = set(only_nodes) if only_nodes is not None else None
    requested: dict[str, list[tuple[str, int]]] = {}

    def ok_act(name: str) -> bool:
        return index.activation(name) and not float_tensor(name)

    for node in index.nodes:
        op = node.op_type
        if op not in COMPUTE_OPS and not (op == "Gather" and index.is_const(node.input[0])):
            continue
        if excluded(node) or (only is not None and node.name not in only):
            continue
        if (
            op == "Add"
            and float_residual_adds
            and any(c.op_type in _NORMS for c in index.consumers.get(node.output[0], []))
        ):
            continue
        acts: list[int] = []
        weights: list[tuple[int, WeightSpec]] = []
        bias: int | None = None
        refuse = False
        if op == "Gather":
            if index.is_float(node.input[0]):
                weights.append((0, WeightSpec(axis=None, reduce_axis=None)))
        elif op in LINEAR_OPS:
            w = linear_weight(index, node)
            data_inputs = [0] if w else [0, 1]
            if w:
                weights.append(w)
            elif op == "MatMul" and index.is_const(node.input[0]):
                refuse = True
            for i in data_inputs:
                if ok_act(node.input[i]):
                    acts.append(i)
                else:
                    refuse = True
            if op in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2:
                if node.input[2] and index.is_const(node.input[2]) and w:
                    if op != "Gemm" or (_attr(node, "alpha", 1.0) == 1.0
                                        and _attr(node, "beta", 1.0) == 1.0):  # fmt: skip
                        bias = 2
        else:
            for i, name in enumerate(node.input):
                if not name:
                    continue
                if op in ("Softmax", "Sigmoid", "AveragePool", "GlobalAveragePool") and i > 0:
                    break
                if index.is_const(name):
                    if not quantize_constant_operands or not index.is_float(name):
                        refuse = True
                    else:
                        weights.append((i, WeightSpec(None, None, as_activation=True)))
                elif ok_act(name):
                    acts.append(i)
                else:
                    refuse = True
        if refuse or not (acts or weights):
            continue
        plan.nodes.append(node.name)
        for i in acts:
            requested.setdefault(node.input[i], []).append((node.name, i))
        for i, spec in weights:
            plan.weights.setdefault(node.input[i], spec)
            plan.weight_uses.add((node.name, i))
        if bias is not None and acts:
            plan.biases[node.input[2]] = (node.input[0], node.input[1], node.name)

    # Data movement: walk producers backwards; a wanted output pulls its input in.
    root: dict[str, str] = {name: name for name in requested}
    for node in reversed(index.nodes):
        if node.op_type not in DATA_MOVEMENT or excluded(node):
            continue
        if not any(o in requested for o in node.output):
            continue
        src = node.input[0]
        if not ok_act(src) or any(not ok_act(o) for o in node.output if o in requested):
            continue
        if node.op_type == "Gather" and index.is_const(src):
            continue
        requested.setdefault(src, []).append((node.name, 0))
        root.setdefault(src, src)
        for o in node.output:
            if o in requested:
                root[o] = src
        plan.nodes.append(node.name)

    def find(name: str) -> str:
        while root[name] != name:
            name = root[name]
        return name

    for name, uses in requested.items():
        plan.activations[name] = find(name)
        plan.act_uses.update(uses)
    return plan
