"""Shared machinery of the rewrite passes: rule passes, refusal log, Q/DQ readers.

Passes are onnx-ir ``InPlacePass`` subclasses (``call(model) -> PassResult``) so that
``onnx_ir.passes.PassManager`` can run an ordered list of them to a fixed point.
A rule pass visits the nodes whose op type is one of its ``anchors`` and calls its
``_try_...`` helpers; a helper returns True when it rewrote the node unit, or the
result of ``self.refuse(node, why)``. Refusals and firings go to an optional
`ExplainLog` so ``qlinear optimize --explain`` can tell the user, per node unit,
which rule fired or why none did. Matching never looks at names.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir import passes

from qlinear.errors import QuantParamsError
from qlinear.quant import QuantParams, from_onnx

#: The key under which a fused node records the float tensor it replaces (compare uses it).
REPLACES_KEY = "qlinear.replaces"
MS_DOMAIN = "com.microsoft"
_REWRITTEN = "qlinear.rewritten"


# -- explain log ------------------------------------------------------------------------


@dataclass
class UnitRecord:
    """What happened to one node unit (keyed by the float op's output tensor)."""

    op_type: str
    tensor: str
    fired: str | None = None
    refusals: list[tuple[str, str]] = field(default_factory=list)


class ExplainLog:
    """Per node unit: the rule that fired, or each rule's reason for refusing."""

    def __init__(self) -> None:
        self.units: dict[str, UnitRecord] = {}

    def _unit(self, node: ir.Node) -> UnitRecord:
        tensor = node.outputs[0].name or "?" if node.outputs else "?"
        key = node.meta.get(REPLACES_KEY) or tensor
        if key not in self.units:
            self.units[key] = UnitRecord(node.op_type, key)
        return self.units[key]

    def fired(self, node: ir.Node, rule: str) -> None:
        self._unit(node).fired = rule

    def refused(self, node: ir.Node, rule: str, reason: str) -> None:
        unit = self._unit(node)
        if (rule, reason) not in unit.refusals:
            unit.refusals.append((rule, reason))

    def lines(self) -> list[str]:
        out = []
        for unit in self.units.values():
            if unit.fired:
                out.append(f"{unit.op_type} -> {unit.tensor}: {unit.fired}")
            else:
                why = "; ".join(f"{rule}: {reason}" for rule, reason in unit.refusals)
                out.append(f"{unit.op_type} -> {unit.tensor}: no rule fired ({why})")
        return out


class RulePass(passes.InPlacePass):
    """A family of rewrite rules anchored on some op types (default domain only)."""

    #: Op types this pass tries to rewrite.
    anchors: frozenset[str] = frozenset()
    #: Anchors that are worth logging in --explain (float compute ops).
    logged: frozenset[str] = frozenset()

    def __init__(self, log: ExplainLog | None = None) -> None:
        super().__init__()
        self.log = log

    def call(self, model: ir.Model) -> passes.PassResult:
        modified = False
        graph = model.graph
        for node in list(graph):
            if node.graph is not graph or node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type not in self.anchors or _dead(node):
                continue
            if self.try_node(graph, node):
                modified = True
        return passes.PassResult(model, modified)

    def try_node(self, graph: ir.Graph, node: ir.Node) -> bool:
        raise NotImplementedError

    def refuse(self, node: ir.Node, reason: str) -> bool:
        if self.log is not None and node.op_type in self.logged:
            self.log.refused(node, type(self).__name__, reason)
        return False

    def fired(self, node: ir.Node, rule: str) -> bool:
        node.meta[_REWRITTEN] = True
        if self.log is not None and node.op_type in self.logged:
            self.log.fired(node, f"{type(self).__name__}: {rule}")
        return True


# -- graph helpers ----------------------------------------------------------------------


def _dead(node: ir.Node) -> bool:
    """A node left behind by an earlier rewrite (removed at the end of the step)."""
    if node.meta.get(_REWRITTEN):
        return True
    return not any(o.uses() or o.is_graph_output() for o in node.outputs)


_counter = itertools.count()


def fresh_name(base: str) -> str:
    """A value name unlikely to clash (names are for humans; matching never uses them)."""
    return f"{base}__ql{next(_counter)}"


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant a value holds (initializer or Constant node), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        attr = node.attributes.get("value")
        if attr is not None and attr.value is not None:
            return attr.value.numpy()
    return None


def add_initializer(graph: ir.Graph, array: np.ndarray, base: str) -> ir.Value:
    value = ir.Value(name=fresh_name(base), const_value=ir.tensor(np.asarray(array), name=None))
    value.const_value.name = value.name
    value.shape = ir.Shape(np.asarray(array).shape)
    value.type = ir.TensorType(ir.DataType.from_numpy(np.asarray(array).dtype))
    graph.register_initializer(value)
    return value


def consumers(value: ir.Value) -> list[ir.Node]:
    return list(dict.fromkeys(use.node for use in value.uses()))


def single_op(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def replace_output(
    graph: ir.Graph, old: ir.Value, new: ir.Value, *, take_name: bool = False
) -> None:
    """Point every use of `old` (graph outputs included, keeping the name) at `new`.

    take_name: `new` now computes what `old` did (a fold made the producer absorb the
    consumer), so it also takes `old`'s name; the tensor `new` was named for no longer
    exists. Per-layer compare matches tensors by name, so a folded Conv must not keep
    reporting its pre-BatchNorm name for a post-BatchNorm value.
    """
    if new.shape is None and old.shape is not None:
        new.shape = old.shape
    if new.type is None and old.type is not None:
        new.type = old.type
    is_output = old.is_graph_output()
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if (take_name or is_output) and name:
        old.name = fresh_name(name)
        new.name = name
    elif new.name is None:
        new.name = fresh_name(name or "v")


def record_replaces(node: ir.Node, tensor: str | None) -> None:
    """Tag a fused node with the float tensor it computes (for per-layer compare)."""
    if tensor:
        node.metadata_props[REPLACES_KEY] = tensor
        node.doc_string = f"{REPLACES_KEY}={tensor}"
        node.meta[REPLACES_KEY] = tensor


def new_node(
    graph: ir.Graph,
    before: ir.Node,
    op_type: str,
    inputs: Iterable[ir.Value | None],
    attributes: dict | None = None,
    *,
    domain: str = "",
    num_outputs: int = 1,
) -> ir.Node:
    node = ir.node(op_type, list(inputs), attributes or {}, domain=domain, num_outputs=num_outputs)
    for out in node.outputs:
        out.name = fresh_name(op_type)
    node.name = fresh_name(op_type)
    graph.insert_before(before, node)
    return node


def ensure_opset(model_or_graph: ir.Graph, domain: str, version: int) -> None:
    if domain not in model_or_graph.opset_imports:
        model_or_graph.opset_imports[domain] = version


# -- Q / DQ -------------------------------------------------------------------------------


@dataclass
class QDQ:
    """A QuantizeLinear or DequantizeLinear node with constant parameters, read once."""

    node: ir.Node
    scale: ir.Value
    zero_point: ir.Value | None
    params: QuantParams
    axis: int | None  # the channel axis of a per-axis tensor, None when per-tensor

    @property
    def dtype(self) -> np.dtype:
        return self.params.dtype

    @property
    def per_tensor(self) -> bool:
        return self.params.is_per_tensor

    @property
    def scalar_scale(self) -> np.float32:
        return np.float32(self.params.scale.reshape(-1)[0])

    @property
    def scalar_zp(self) -> int:
        return int(self.params.zero_point.reshape(-1)[0])

    def same_params(self, other: QDQ) -> bool:
        """Same quantization (per-tensor parameters compare whatever the tensor ranks)."""
        if self.per_tensor and other.per_tensor:
            return (
                self.dtype == other.dtype
                and self.scalar_scale == other.scalar_scale
                and self.scalar_zp == other.scalar_zp
            )
        return self.params == other.params and self.axis == other.axis


def _rank(value: ir.Value | None) -> int | None:
    if value is None:
        return None
    if value.shape is not None:
        return len(value.shape)
    arr = const_array(value)
    return None if arr is None else arr.ndim


_INT8 = (np.dtype(np.int8), np.dtype(np.uint8))


def read_qdq(node: ir.Node | None, op_type: str, *, int32: bool = False) -> QDQ | str:
    """The node's params, or the reason it is not a usable `op_type` (a refusal text)."""
    if node is None or not single_op(node, op_type):
        return f"input is not produced by {op_type}"
    inputs = list(node.inputs) + [None] * (3 - len(node.inputs))
    scale_v, zp_v = inputs[1], inputs[2]
    scale = const_array(scale_v)
    if scale is None:
        return f"{op_type} scale is not a constant"
    zp = const_array(zp_v) if zp_v is not None else None
    if zp_v is not None and zp is None:
        return f"{op_type} zero point is not a constant"
    attrs = node.attributes
    block = attrs.get("block_size")
    if block is not None and block.as_int():
        return f"{op_type} is blockwise (block_size={block.as_int()})"
    axis = attrs["axis"].as_int() if "axis" in attrs else 1
    out_dtype = None
    if "output_dtype" in attrs and attrs["output_dtype"].as_int():
        out_dtype = ir.DataType(attrs["output_dtype"].as_int()).numpy()
    data = inputs[0] if op_type == "DequantizeLinear" else node.outputs[0]
    rank = _rank(data)
    if rank is None:
        if scale.size != 1:
            return f"{op_type} is per-axis but the tensor's rank is unknown"
        rank = 0
    if op_type == "DequantizeLinear" and inputs[0] is not None and inputs[0].dtype is not None:
        elem = inputs[0].dtype.numpy()
        if zp is None:
            out_dtype = elem
    try:
        params = from_onnx(scale, zp, rank, axis=axis, dtype=out_dtype)
    except (QuantParamsError, ValueError, TypeError) as exc:
        return f"{op_type} parameters unusable: {exc}"
    if params.dtype not in _INT8 and not (int32 and params.dtype == np.int32):
        return f"{op_type} dtype is {params.dtype}, not int8/uint8"
    ch_axis = None if params.is_per_tensor else params.channel_axis()
    return QDQ(node, scale_v, zp_v, params, ch_axis)


def dq_of(value: ir.Value | None, *, int32: bool = False) -> QDQ | str:
    """The DequantizeLinear producing `value` (a node unit input), or a refusal text."""
    if value is None:
        return "input is missing"
    return read_qdq(value.producer(), "DequantizeLinear", int32=int32)


def only_q_consumer(value: ir.Value) -> QDQ | str:
    """The single QuantizeLinear (or identical ones) all uses of `value` go to, or why not."""
    if value.is_graph_output():
        return "output is a graph output (float)"
    users = consumers(value)
    if not users:
        return "output is unused"
    qs = []
    for user in users:
        q = read_qdq(user, "QuantizeLinear")
        if isinstance(q, str):
            return f"output has a float consumer ({user.op_type})"
        qs.append(q)
    if any(not q.same_params(qs[0]) for q in qs[1:]):
        return "output feeds QuantizeLinear nodes with different parameters"
    return qs[0]


def redirect_qs(graph: ir.Graph, value: ir.Value, new: ir.Value) -> None:
    """Every QuantizeLinear consuming `value` now reads from `new` (already quantized)."""
    for user in consumers(value):
        replace_output(graph, user.outputs[0], new)


def zero_point_value(graph: ir.Graph, qdq: QDQ) -> ir.Value:
    """The QDQ's zero point value, creating an explicit zero when ONNX left it out."""
    if qdq.zero_point is not None:
        return qdq.zero_point
    return add_initializer(graph, np.zeros((), qdq.dtype), "zero_point")


def tensor_dtype(value: ir.Value | None) -> np.dtype | None:
    if value is None or value.dtype is None:
        return None
    try:
        return np.dtype(value.dtype.numpy())
    except (TypeError, ValueError):
        return None


def output_unit(node: ir.Node) -> tuple[QDQ, ir.Value] | str:
    """The Q after `node` (through an absorbable Relu/Clip) and the value it quantizes."""
    out = node.outputs[0]
    users = consumers(out)
    if len(users) == 1 and not out.is_graph_output():
        act = users[0]
        if single_op(act, "Relu") or single_op(act, "Clip"):
            q = only_q_consumer(act.outputs[0])
            if isinstance(q, str):
                return f"after {act.op_type}: {q}"
            why = _activation_is_noop(act, q)
            if why:
                return why
            return q, act.outputs[0]
    q = only_q_consumer(out)
    if isinstance(q, str):
        return q
    return q, out


def _activation_is_noop(act: ir.Node, q: QDQ) -> str | None:
    """None when Q(act(y)) == Q(y) for every y; otherwise why not."""
    if not q.per_tensor:
        return f"{act.op_type} before a per-axis QuantizeLinear"
    qmin, qmax = q.params.qmin, q.params.qmax
    if act.op_type == "Relu":
        if q.scalar_zp != qmin:
            return f"Relu not absorbable: output zero point {q.scalar_zp} != qmin {qmin}"
        return None
    lo = const_array(act.inputs[1]) if len(act.inputs) > 1 and act.inputs[1] else None
    hi = const_array(act.inputs[2]) if len(act.inputs) > 2 and act.inputs[2] else None
    if (len(act.inputs) > 1 and act.inputs[1] is not None and lo is None) or (
        len(act.inputs) > 2 and act.inputs[2] is not None and hi is None
    ):
        return "Clip bounds are not constants"
    scale, zp = q.scalar_scale, q.scalar_zp
    if lo is not None and np.rint(np.float32(lo) / scale) + zp > qmin:
        return "Clip lower bound is inside the output quantization range"
    if hi is not None and np.rint(np.float32(hi) / scale) + zp < qmax:
        return "Clip upper bound is inside the output quantization range"
    return None
