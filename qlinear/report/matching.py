"""Which tensor of model B holds the value of which tensor of model A (per-layer compare).

Matching is structural. Each model gets a *view*: a map from **float tensor
name** (the key) to the value that carries it in that model:

- a float node output ``T`` is carried by ``T`` itself;
- in a QDQ graph, ``T → QuantizeLinear → DequantizeLinear → T'``: ``T`` is carried
  by ``T'`` (the dequantized value, which includes ``T``'s quantization error).
  Quantizers keep the float names of activations, so the Q input name is the key;
- a fused node (e.g. QLinearConv from the optimizer) carries the float tensor it
  replaced, named by ``qlinear.replaces=<name>`` in its ``metadata_props`` or
  ``doc_string`` (comma-separated, one per output). Its int8 output is read
  through a consumer DequantizeLinear, else dequantized with the node's own
  output scale / zero point (``Y_SCALE_INPUTS``) — the pluggable part;
- values computed from constants only (weights, their DQs, folded shapes) and
  non-float values are not layers.

Keys present in both views match by name. A key only B has is matched through
graph position: B's producer has the same op type as an A node whose activation
inputs are the already-matched keys, in order (this survives renamed outputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

#: Fused quantized ops: (output scale input index, output zero point input index).
Y_SCALE_INPUTS: dict[str, tuple[int, int]] = {
    "QLinearConv": (6, 7),
    "QLinearMatMul": (6, 7),
    "QLinearAdd": (6, 7),
    "QLinearMul": (6, 7),
    "QGemm": (7, 8),
    "QLinearSigmoid": (3, 4),
    "QLinearLeakyRelu": (3, 4),
    "QLinearSoftmax": (3, 4),
    "QLinearGlobalAveragePool": (3, 4),
    "QLinearAveragePool": (3, 4),
    "QLinearConcat": (0, 1),
}

#: Fused quantized ops: (weight, weight scale, weight zero point) input indices.
WEIGHT_INPUTS: dict[str, tuple[int, int, int]] = {
    "QLinearConv": (3, 4, 5),
    "QLinearMatMul": (3, 4, 5),
    "QGemm": (3, 4, 5),
    "MatMulIntegerToFloat": (1, 3, 5),
    "DynamicQuantizeMatMul": (1, 2, 3),
}

REPLACES_KEY = "qlinear.replaces"
#: Set by the layout pass on nodes whose outputs are NHWC.
LAYOUT_KEY = "qlinear.layout"
_QDQ = {"QuantizeLinear", "DequantizeLinear"}
_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}


@dataclass(frozen=True)
class ValueRef:
    """A value to fetch from a run; dequantized afterwards when scale is set."""

    name: str
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    axis: int = 1

    def resolve(self, value: np.ndarray) -> np.ndarray:
        if self.scale is None:
            return value
        scale = _bcast(self.scale, value.ndim, self.axis)
        zp = _bcast(self.zero_point, value.ndim, self.axis) if self.zero_point is not None else 0
        return ((value.astype(np.float32) - np.float32(zp)) * scale).astype(np.float32)


def _bcast(a: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if a.size == 1:
        return a.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = a.size
    return a.reshape(shape)


@dataclass
class GraphView:
    """One model's float-name view: key -> carrying value, its producer and its inputs."""

    model: onnx.ModelProto
    refs: dict[str, ValueRef] = field(default_factory=dict)
    producer: dict[str, onnx.NodeProto | None] = field(default_factory=dict)
    how: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # keys in topological order
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    const_derived: set[str] = field(default_factory=set)
    producers: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    elem_types: dict[str, int] = field(default_factory=dict)

    def key_of(self, value: str) -> str | None:
        """The key whose carrier (or own float name) is `value`, tracing back through Q/DQ."""
        if value in self.refs:
            return value
        for key, ref in self.refs.items():
            if ref.name == value:
                return key
        node = self.producers.get(value)
        if node is not None and node.op_type == "DequantizeLinear":
            q = self.producers.get(node.input[0])
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in self.refs:
                return q.input[0]
        return None

    def activation_inputs(self, key: str) -> list[str] | None:
        """Keys feeding the producer of `key` (None if one cannot be traced)."""
        node = self.producer.get(key)
        if node is None:
            return []
        keys = []
        for name in node.input:
            if not name or name in self.const_derived:
                continue
            k = self.key_of(name)
            if k is None:
                return None
            keys.append(k)
        return keys


@dataclass(frozen=True)
class LayerMatch:
    """A float tensor found in both models: where each carries it and how it was matched."""

    key: str  # the float tensor name in model A
    key_b: str  # the float tensor name in model B (differs when matched by structure)
    a: ValueRef
    b: ValueRef
    op_a: str
    op_b: str
    node_b: str
    how: str  # "name", "replaces" or "structure"
    inputs: tuple[str, ...]  # A keys of the layer's activation inputs
    position: int  # index in B's topological order


def build_view(model: onnx.ModelProto) -> GraphView:
    """The float-name view of one model (see module docstring)."""
    graph = model.graph
    view = GraphView(model)
    view.consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    view.consts[node.output[0]] = numpy_helper.to_array(attr.t)
    view.elem_types = _elem_types(model)
    order = _topological(graph)
    derived = set(view.consts)
    for node in order:
        for out in node.output:
            if out:
                view.producers[out] = node
        for name in node.input:
            if name:
                view.consumers.setdefault(name, []).append(node)
        if all(not n or n in derived for n in node.input):
            derived.update(o for o in node.output if o)
    view.const_derived = derived
    inputs = [vi.name for vi in graph.input if vi.name not in view.consts]
    for name in inputs:
        _add(view, name, ValueRef(name), None, "name")
    for node in order:
        if any(o in derived for o in node.output if o):
            continue
        if _channels_last(node):
            continue  # its values are NHWC copies of A's NCHW tensors: not comparable as is
        if node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx"):
            source = node.input[0]
            dq = _dq_consumer(view, node.output[0])
            if dq is not None and source in view.refs:
                view.refs[source] = ValueRef(dq.output[0])
            continue
        if node.op_type in _QDQ:
            continue
        replaced = _replaces(node)
        if replaced:
            for out, key in zip(node.output, replaced, strict=False):
                ref = _fused_ref(view, node, out)
                if key and out and ref is not None:
                    _add(view, key, ref, node, "replaces")
            continue
        for out in node.output:
            if out and _is_float(view, out):
                _add(view, out, ValueRef(out), node, "name")
    return view


def _add(view: GraphView, key: str, ref: ValueRef, node: onnx.NodeProto | None, how: str) -> None:
    if key not in view.refs:
        view.order.append(key)
    view.refs[key] = ref
    view.producer[key] = node
    view.how[key] = how


def _is_float(view: GraphView, name: str) -> bool:
    elem = view.elem_types.get(name)
    return elem is None or elem in _FLOAT_TYPES


def _dq_consumer(view: GraphView, value: str) -> onnx.NodeProto | None:
    for node in view.consumers.get(value, []):
        if node.op_type == "DequantizeLinear":
            return node
    return None


def _channels_last(node: onnx.NodeProto) -> bool:
    """Tagged by the layout pass: the node's outputs are channels-last (NHWC)."""
    return any(
        p.key == LAYOUT_KEY and p.value.lower() in ("nhwc", "to_nhwc") for p in node.metadata_props
    )


def _replaces(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == REPLACES_KEY:
            return [s.strip() for s in prop.value.split(",")]
    for line in node.doc_string.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == REPLACES_KEY:
            return [s.strip() for s in value.split(",")]
    return []


def _fused_ref(view: GraphView, node: onnx.NodeProto, out: str) -> ValueRef | None:
    dq = _dq_consumer(view, out)
    if dq is not None:
        return ValueRef(dq.output[0])
    if _is_float(view, out) and node.op_type not in Y_SCALE_INPUTS:
        return ValueRef(out)
    indices = Y_SCALE_INPUTS.get(node.op_type)
    if indices is None:
        return None
    s, z = (node.input[i] if i < len(node.input) else "" for i in indices)
    if s not in view.consts:
        return None
    zp = view.consts.get(z) if z else None
    return ValueRef(out, view.consts[s], zp, axis=1)


def match_layers(model_a: onnx.ModelProto, model_b: onnx.ModelProto) -> list[LayerMatch]:
    """Pairs of values carrying the same float tensor, in model B's topological order."""
    va, vb = build_view(model_a), build_view(model_b)
    b_to_a: dict[str, str] = {}
    how: dict[str, str] = {}
    for key in vb.order:
        if key in va.refs:
            b_to_a[key] = key
            how[key] = vb.how[key]
    taken = set(b_to_a.values())
    for key in vb.order:  # topological: inputs of a layer are matched before it
        if key in b_to_a:
            continue
        found = _structural(va, vb, key, b_to_a, taken)
        if found is not None:
            b_to_a[key] = found
            taken.add(found)
            how[key] = "structure"
    matches = []
    for position, key in enumerate(vb.order):
        a_key = b_to_a.get(key)
        if a_key is None:
            continue
        node_b = vb.producer.get(key)
        node_a = va.producer.get(a_key)
        inputs = vb.activation_inputs(key) or []
        matches.append(
            LayerMatch(
                key=a_key,
                key_b=key,
                a=va.refs[a_key],
                b=vb.refs[key],
                op_a=node_a.op_type if node_a is not None else "input",
                op_b=node_b.op_type if node_b is not None else "input",
                node_b=node_b.name if node_b is not None else key,
                how=how[key],
                inputs=tuple(b_to_a[k] for k in inputs if k in b_to_a),
                position=position,
            )
        )
    return matches


def _structural(
    va: GraphView, vb: GraphView, key: str, b_to_a: dict[str, str], taken: set[str]
) -> str | None:
    node_b = vb.producer.get(key)
    inputs_b = vb.activation_inputs(key)
    if node_b is None or inputs_b is None or any(k not in b_to_a for k in inputs_b):
        return None
    wanted = [b_to_a[k] for k in inputs_b]
    index = _out_index(vb, key)
    candidates = []
    for a_key in va.order:
        node_a = va.producer.get(a_key)
        if node_a is None or a_key in taken or node_a.op_type != node_b.op_type:
            continue
        if _out_index(va, a_key) != index:
            continue
        if va.activation_inputs(a_key) == wanted:
            candidates.append(a_key)
    return candidates[0] if len(candidates) == 1 else None


def _out_index(view: GraphView, key: str) -> int:
    node = view.producer.get(key)
    if node is None:
        return 0
    if key in node.output:
        return list(node.output).index(key)
    replaced = _replaces(node)
    return replaced.index(key) if key in replaced else 0


@dataclass(frozen=True)
class WeightInfo:
    """The quantized weight of a layer in B: its float values and granularity."""

    values: np.ndarray
    per_channel: bool
    channel_axis: int


def layer_weight(view: GraphView, key: str) -> WeightInfo | None:
    """The (dequantized) weight feeding the producer of `key` in the view's model, if any."""
    node = view.producer.get(key)
    if node is None:
        return None
    if node.op_type in WEIGHT_INPUTS:
        w, s, z = (node.input[i] for i in WEIGHT_INPUTS[node.op_type])
        if w in view.consts and s in view.consts:
            q = view.consts[w]
            axis = _out_axis(node, q)  # per-channel parameters run along the output axis
            values = ValueRef(w, view.consts[s], view.consts.get(z), axis=axis).resolve(q)
            return WeightInfo(values, view.consts[s].size > 1, axis)
        return None
    if node.op_type not in _CHANNEL_WEIGHT_OPS:
        return None  # a Gather table or an Add constant has no output channels to judge
    for name in node.input:
        dq = view.producers.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in view.consts:
            continue
        q = view.consts[dq.input[0]]
        if q.ndim < 2:
            continue
        scale = view.consts.get(dq.input[1])
        if scale is None:
            return None
        zp = view.consts.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        values = ValueRef(name, scale, zp, axis=axis).resolve(q)
        return WeightInfo(values, scale.size > 1, _out_axis(node, values))
    return None


#: Float ops whose dequantized constant input is a weight with output channels.
_CHANNEL_WEIGHT_OPS = frozenset({"Conv", "MatMul", "Gemm"})


def _out_axis(node: onnx.NodeProto, weight: np.ndarray) -> int:
    """The axis of a weight that indexes output channels."""
    if node.op_type in ("Gemm", "QGemm"):
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else weight.ndim - 1
    if node.op_type in ("MatMul", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                        "DynamicQuantizeMatMul"):
        return weight.ndim - 1
    return 0


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    g = inferred.graph
    return {
        vi.name: vi.type.tensor_type.elem_type
        for vi in list(g.input) + list(g.value_info) + list(g.output)
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type
    }


def _topological(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes in dependency order (graph order breaks ties); cycles keep file order."""
    produced: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            if out:
                produced[out] = i
    deps = [
        {produced[n] for n in node.input if n in produced and produced[n] != i}
        for i, node in enumerate(graph.node)
    ]
    done: set[int] = set()
    visiting: set[int] = set()
    order: list[int] = []
    for start in range(len(graph.node)):
        stack = [(start, False)]
        while stack:
            i, expanded = stack.pop()
            if i in done:
                continue
            if expanded:
                done.add(i)
                order.append(i)
                continue
            if i in visiting:  # a cycle: leave it to the runtime to report
                continue
            visiting.add(i)
            stack.append((i, True))
            stack.extend((d, False) for d in sorted(deps[i], reverse=True) if d not in done)
    return [graph.node[i] for i in order]
