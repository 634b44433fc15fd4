"""Layout analysis: which memory format every rank-4 value gets (design §3 Layout).

Why an analysis separate from the rewrite: the classic channels-last bug is a rewrite
that replaces a shared activation by its NHWC copy *after* a broadcasting consumer
(``Add(x, c[1,C,1,1])``) was already processed, leaving one operand NHWC and the other
NCHW. Here every decision is made first, on the unchanged graph; the rewrite only
applies it, and `check_layout` verifies the result.

Formats are relative to the graph as it is: ``NCHW`` means "as now", ``NHWC`` means
"channels moved last" (perm 0,2,3,1). Each node gets a `Role`:

- ``sensitive``: runs channels-last after the rewrite (QLinearConv -> com.microsoft
  QLinearConv channels_last=1, int8 MaxPool -> com.microsoft.NhwcMaxPool,
  QLinearGlobalAveragePool channels_last=1, and with ``custom_ops`` ConvInteger ->
  ai.qlinear.ConvInteger): its data input must be NHWC, its output is NHWC.
- ``agnostic``: elementwise, Q/DQ, Concat/Softmax/Reduce/Resize (axes remapped): all
  its rank-4 activation operands and outputs take one format, chosen per connected
  group; constant operands are permuted to match.
- ``flat``: Flatten/Reshape of a [N, C, 1, 1] tensor: reads either format (same bytes).
- ``fixed``: anything else, graph inputs and outputs: NCHW ("as now").

A sensitive node alone (no other sensitive node in the groups it reads and writes)
stays NCHW: two transposes around one operator cost more than they save.
A group of values joined by agnostic nodes is NHWC when that needs fewer transposed
bytes at its boundary than NCHW (so an input transpose lands after the first
QuantizeLinear, on 1-byte data). Transposes go at the remaining boundaries, one per
(value, format).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qlinear.errors import QlinearError
from qlinear.passes._infra import MS_DOMAIN, const_array

NCHW = "NCHW"
NHWC = "NHWC"
ANY = "ANY"  # a graph input, as seen by `infer_formats`
TO_NHWC = (0, 2, 3, 1)
TO_NCHW = (0, 3, 1, 2)
#: Domain of qlinear's own operators (no onnxruntime implementation).
QLINEAR_DOMAIN = "ai.qlinear"
#: Node metadata marking a Transpose the layout pass inserted (a format conversion).
LAYOUT_KEY = "qlinear.layout"


class LayoutInvariantError(QlinearError, AssertionError):
    """A node's operands ended up in different memory formats."""


@dataclass(frozen=True)
class Role:
    """How a node relates to memory formats (see the module docstring)."""

    kind: str  # "sensitive" | "agnostic" | "flat" | "native" | "fixed"
    acts: tuple[int, ...] = ()  # inputs carrying the format
    outs: tuple[int, ...] = ()  # outputs carrying the format
    consts: tuple[int, ...] = ()  # constant operands permuted with the format (agnostic)
    remap: str | None = None  # attribute/input remapping of an agnostic node
    why: str = ""  # for fixed: why the node cannot change format


_UNARY = frozenset(
    {
        "Relu",
        "Clip",
        "Sigmoid",
        "Tanh",
        "LeakyRelu",
        "HardSigmoid",
        "HardSwish",
        "Elu",
        "Selu",
        "Celu",
        "Softplus",
        "Softsign",
        "Neg",
        "Abs",
        "Exp",
        "Log",
        "Sqrt",
        "Reciprocal",
        "Erf",
        "Floor",
        "Ceil",
        "Round",
        "Sign",
        "Identity",
        "Cast",
        "Gelu",
        "Mish",
        "ThresholdedRelu",
        "Not",
        "IsNaN",
        "IsInf",
    }
)
_BROADCAST = frozenset(
    {
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Max",
        "Min",
        "Sum",
        "Mean",
        "PRelu",
        "Equal",
        "Less",
        "Greater",
        "LessOrEqual",
        "GreaterOrEqual",
        "And",
        "Or",
        "Xor",
        "Where",
        "Mod",
        "BitShift",
    }
)
_MS_OPERANDS = {
    "QLinearAdd": (0, 3),
    "QLinearMul": (0, 3),
    "QLinearSigmoid": (0,),
    "QLinearLeakyRelu": (0,),
}
_AXIS_OPS = frozenset({"Softmax", "LogSoftmax", "Hardmax"})
_REDUCE = frozenset(
    {
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceSumSquare",
    }
)
_INT8 = (ir.DataType.UINT8, ir.DataType.INT8)


# -- small readers ------------------------------------------------------------------------


def _std(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def constant(value: ir.Value | None) -> np.ndarray | None:
    """A value's constant (initializer, Constant, or Reshape/Unsqueeze of constants)."""
    arr = const_array(value)
    if arr is not None or value is None:
        return arr
    node = value.producer()
    if node is None or not _std(node) or node.op_type not in ("Reshape", "Unsqueeze", "Identity"):
        return None
    data = const_array(_input(node, 0))
    if data is None:
        return None
    if node.op_type == "Identity":
        return data
    second = const_array(_input(node, 1))
    if node.op_type == "Unsqueeze":
        axes = second if second is not None else node.attributes.get("axes")
        if axes is None:
            return None
        axes = axes if isinstance(axes, np.ndarray) else np.asarray(axes.as_ints())
        out = data
        rank = data.ndim + len(axes)
        for a in sorted(int(a) % rank for a in axes):
            out = np.expand_dims(out, a)
        return out
    if second is None:
        return None
    shape = [int(s) for s in second]
    if not _attr_int(node, "allowzero", 0):
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    try:
        return data.reshape(shape)
    except ValueError:
        return None


def _dims(value: ir.Value | None) -> tuple | None:
    if value is None or value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in value.shape)


class Ranks:
    """Ranks of values: from shapes, else propagated from producers (memoized)."""

    def __init__(self) -> None:
        self._memo: dict[ir.Value, int | None] = {}

    def __call__(self, value: ir.Value | None) -> int | None:
        if value is None:
            return None
        if value in self._memo:
            return self._memo[value]
        self._memo[value] = None  # cycle guard
        rank = self._compute(value)
        self._memo[value] = rank
        return rank

    def _compute(self, value: ir.Value) -> int | None:
        if value.shape is not None:
            return len(value.shape)
        arr = constant(value)
        if arr is not None:
            return arr.ndim
        node = value.producer()
        if node is None or value is not node.outputs[0]:
            return None
        op = node.op_type
        if op == "Transpose" and "perm" in node.attributes:
            return len(node.attributes["perm"].as_ints())
        same_as_input = (
            op in _UNARY
            or op in _MS_OPERANDS
            or op in _AXIS_OPS
            or op
            in (
                "QuantizeLinear",
                "DequantizeLinear",
                "DynamicQuantizeLinear",
                "QLinearConv",
                "ConvInteger",
                "Conv",
                "MaxPool",
                "NhwcMaxPool",
                "QLinearGlobalAveragePool",
                "QLinearAveragePool",
                "AveragePool",
                "GlobalAveragePool",
                "Resize",
                "QLinearSoftmax",
            )
        )
        if same_as_input:
            return self(_input(node, 0))
        if op in _BROADCAST or op == "Concat":
            ranks = [self(v) for v in node.inputs if v is not None]
            return None if any(r is None for r in ranks) or not ranks else max(ranks)
        return None


# -- roles ----------------------------------------------------------------------------------


def _fixed(why: str) -> Role:
    return Role("fixed", why=why)


def _is_act4(value: ir.Value | None, ranks: Ranks) -> bool:
    return value is not None and ranks(value) == 4 and constant(value) is None


def _operands(node: ir.Node, indices, ranks: Ranks) -> tuple[tuple, tuple] | str:
    """(activation inputs, permutable constant inputs) of an elementwise node, or why not."""
    acts, consts = [], []
    for i in indices:
        v = _input(node, i)
        if v is None:
            continue
        arr = constant(v)
        if arr is not None:
            if arr.size > 1:
                if arr.ndim > 4:
                    return f"constant operand {i} has rank {arr.ndim} > 4"
                consts.append(i)
            continue
        rank, dims = ranks(v), _dims(v)
        if rank == 4:
            acts.append(i)
        elif rank == 0 or (dims is not None and None not in dims and np.prod(dims) == 1):
            continue  # a scalar broadcasts the same in either format
        else:
            return f"operand {i} is a rank-{rank} activation, not rank 4"
    if not acts:
        return "no rank-4 activation operand"
    return tuple(acts), tuple(consts)


def _agnostic(node: ir.Node, indices, ranks: Ranks, remap: str | None = None) -> Role:
    ops = _operands(node, indices, ranks)
    if isinstance(ops, str):
        return _fixed(ops)
    outs = tuple(i for i, o in enumerate(node.outputs) if ranks(o) == 4)
    return Role("agnostic", ops[0], outs, ops[1], remap)


def _order_kept(kept: list[int]) -> bool:
    """Reducing the other axes of NHWC data leaves `kept` in NCHW order."""
    return [a for a in TO_NHWC if a in kept] == sorted(kept)


def _reduce_role(node: ir.Node, ranks: Ranks, opset: int) -> Role:
    axes_in = node.op_type == "ReduceSum" and opset >= 13 or opset >= 18
    if axes_in:
        axes_v = _input(node, 1)
        arr = None if axes_v is None else constant(axes_v)
        if axes_v is not None and arr is None:
            return _fixed("reduction axes are not constant")
        axes = None if arr is None or arr.size == 0 else [int(a) % 4 for a in arr.reshape(-1)]
        if axes is None and _attr_int(node, "noop_with_empty_axes", 0):
            return _fixed("noop_with_empty_axes")
        remap = "axes_input" if axes is not None else None
    else:
        attr = node.attributes.get("axes")
        axes = None if attr is None else [int(a) % 4 for a in attr.as_ints()]
        remap = "axes" if axes is not None else None
    role = _agnostic(node, (0,), ranks, remap)
    if role.kind != "agnostic" or _attr_int(node, "keepdims", 1):
        return role
    kept = [] if axes is None else [a for a in range(4) if a not in axes]
    if not _order_kept(kept):
        return _fixed("keepdims=0 would leave the kept axes in another order")
    return role


def _qdq_role(node: ir.Node, ranks: Ranks) -> Role:
    if _attr_int(node, "block_size", 0):
        return _fixed("blockwise quantization")
    scale = constant(_input(node, 1))
    if scale is None:
        return _fixed("scale is not constant")
    return _agnostic(node, (0,), ranks, None if scale.size == 1 else "qdq_axis")


def _resize_role(node: ir.Node, ranks: Ranks) -> Role:
    if "axes" in node.attributes:
        return _fixed("Resize with axes")
    for i in (1, 2, 3):
        v = _input(node, i)
        if v is not None and v.name != "" and constant(v) is None:
            return _fixed(f"Resize input {i} is not constant")
    return _agnostic(node, (0,), ranks, "resize")


def _flat_role(node: ir.Node, ranks: Ranks) -> Role | None:
    """Flatten/Reshape of [N, C, 1, 1]: same bytes in both formats."""
    x = _input(node, 0)
    dims = _dims(x)
    if not _is_act4(x, ranks) or dims is None or dims[2] != 1 or dims[3] != 1:
        return None
    if node.op_type == "Reshape":
        shape = constant(_input(node, 1))
        if shape is None or any(int(s) == 0 for s in shape.reshape(-1)[1:]):
            return None
    return Role("flat", (0,))


def classify(node: ir.Node, ranks: Ranks, opset: int, custom_ops: bool = False) -> Role:
    """The node's `Role` for the layout pass (refusals explain themselves in `why`)."""
    op, x = node.op_type, _input(node, 0)
    if node.domain == MS_DOMAIN:
        if op in ("QLinearConv", "QLinearGlobalAveragePool"):
            if _attr_int(node, "channels_last", 0):
                return Role("native", (0,), (0,))
            if op == "QLinearConv":
                return _conv_role(node, ranks, 3)
            return Role("sensitive", (0,), (0,)) if _is_act4(x, ranks) else _fixed("rank")
        if op == "NhwcMaxPool":
            return Role("native", (0,), (0,))
        if op in _MS_OPERANDS:
            return _agnostic(node, _MS_OPERANDS[op], ranks)
        if op == "QLinearConcat":
            return _agnostic(node, range(2, len(node.inputs), 3), ranks, "axis")
        if op == "QLinearSoftmax":
            if _attr_int(node, "opset", 13) < 13:
                return _fixed("QLinearSoftmax before opset 13 (2-D coercion)")
            return _agnostic(node, (0,), ranks, "axis")
        return _fixed(f"{node.domain}.{op} has no channels-last rule")
    if node.domain == QLINEAR_DOMAIN and op == "ConvInteger":
        return Role("native", (0,), (0,))
    if not _std(node):
        return _fixed(f"{node.domain}.{op} has no channels-last rule")
    if op == "QLinearConv":
        return _conv_role(node, ranks, 3)
    if op == "ConvInteger":
        if not custom_ops:
            return _fixed("ConvInteger has no channels-last form in onnxruntime")
        return _conv_role(node, ranks, 1)
    if op == "MaxPool":
        if not _is_act4(x, ranks) or x.dtype not in _INT8:
            return _fixed("MaxPool is not an int8/uint8 2-D pool")
        if len(node.outputs) > 1 and node.outputs[1].uses():
            return _fixed("MaxPool indices are used")
        if _attr_int(node, "storage_order", 0):
            return _fixed("MaxPool storage_order=1")
        return Role("sensitive", (0,), (0,))
    if op in _UNARY or op == "DynamicQuantizeLinear":
        return _agnostic(node, (0,), ranks)
    if op in _BROADCAST:
        return _agnostic(node, range(len(node.inputs)), ranks)
    if op in ("QuantizeLinear", "DequantizeLinear"):
        return _qdq_role(node, ranks)
    if op == "Concat":
        return _agnostic(node, range(len(node.inputs)), ranks, "axis")
    if op in _AXIS_OPS:
        if opset < 13:
            return _fixed(f"{op} before opset 13 (2-D coercion)")
        return _agnostic(node, (0,), ranks, "axis")
    if op in _REDUCE:
        return _reduce_role(node, ranks, opset)
    if op == "Resize":
        return _resize_role(node, ranks)
    if op in ("Flatten", "Reshape"):
        return _flat_role(node, ranks) or _fixed(f"{op} of a tensor with spatial extent")
    return _fixed(f"{op} is layout-sensitive and has no channels-last form")


def _conv_role(node: ir.Node, ranks: Ranks, w_index: int) -> Role:
    w = constant(_input(node, w_index))
    if not _is_act4(_input(node, 0), ranks):
        return _fixed("convolution input is not a rank-4 activation")
    if w is None or w.ndim != 4:
        return _fixed("convolution weight is not a constant 4-D tensor")
    return Role("sensitive", (0,), (0,))


# -- the plan ----------------------------------------------------------------------------------


@dataclass
class LayoutPlan:
    """The formats the rewrite applies: per node role, per value format after the rewrite."""

    roles: dict[ir.Node, Role]
    fmt: dict[ir.Value, str]  # rank-4 activations: the format their producer writes
    group_of: dict[ir.Value, int]
    group_fmt: list[str]
    refusals: dict[str, int] = field(default_factory=dict)

    node_fmt: dict[ir.Node, str] = field(default_factory=dict)  # agnostic nodes' format

    @property
    def converts(self) -> list[ir.Node]:
        return [n for n, r in self.roles.items() if r.kind == "sensitive"]

    def node_format(self, node: ir.Node) -> str:
        """The format an agnostic node runs in (its group's)."""
        return self.node_fmt.get(node, NCHW)

    def required(self, node: ir.Node, index: int) -> str | None:
        """The format `node` needs at input `index` if that input is a rank-4 activation
        (None: either format will do, or not an activation input)."""
        role = self.roles.get(node)
        if role is None or role.kind == "flat":
            return None
        if role.kind in ("sensitive", "agnostic"):
            if index not in role.acts:
                return None
            return NHWC if role.kind == "sensitive" else self.node_format(node)
        return NCHW


def _nbytes(value: ir.Value) -> float:
    dims = _dims(value) or (1,)
    size = 4
    if value.dtype is not None:
        try:
            size = np.dtype(value.dtype.numpy()).itemsize
        except (TypeError, ValueError):
            pass
    return float(np.prod([d or 1 for d in dims])) * size


def _is_perm(node: ir.Node | None, perm: tuple[int, ...]) -> bool:
    return (
        node is not None
        and node.op_type == "Transpose"
        and _std(node)
        and "perm" in node.attributes
        and tuple(node.attributes["perm"].as_ints()) == perm
    )


def _demote_islands(roles: dict[ir.Node, Role], group_of: dict[ir.Value, int]) -> None:
    """A sensitive node with no other sensitive node in its input or output group stays
    NCHW: running it alone channels-last costs two transposes and saves nothing."""
    touching: dict[int, set[ir.Node]] = defaultdict(set)
    for node, role in roles.items():
        if role.kind == "sensitive":
            for v in (node.inputs[0], node.outputs[0]):
                if v in group_of:
                    touching[group_of[v]].add(node)
    for node, role in list(roles.items()):
        if role.kind != "sensitive":
            continue
        groups = [group_of[v] for v in (node.inputs[0], node.outputs[0]) if v in group_of]
        if all(touching[g] == {node} for g in groups):
            roles[node] = _fixed("isolated: channels-last would cost two transposes")


def plan_layout(graph: ir.Graph, opset: int, *, custom_ops: bool = False) -> LayoutPlan:
    """Decide the format of every rank-4 activation (the graph is not modified)."""
    ranks = Ranks()
    roles = {node: classify(node, ranks, opset, custom_ops) for node in graph}
    acts: set[ir.Value] = {v for v in graph.inputs if _is_act4(v, ranks)}
    for node in roles:
        acts.update(o for o in node.outputs if _is_act4(o, ranks))
        acts.update(v for v in node.inputs if _is_act4(v, ranks))
    # union-find over values joined by agnostic nodes
    parent: dict[ir.Value, ir.Value] = {v: v for v in acts}

    def find(v: ir.Value) -> ir.Value:
        while parent[v] is not v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    for node, role in roles.items():
        if role.kind != "agnostic":
            continue
        members = [node.inputs[i] for i in role.acts] + [node.outputs[i] for i in role.outs]
        members = [m for m in members if m in parent]
        for m in members[1:]:
            ra, rb = find(members[0]), find(m)
            if ra is not rb:
                parent[rb] = ra
    roots: dict[ir.Value, int] = {}
    group_of = {v: roots.setdefault(find(v), len(roots)) for v in acts}
    _demote_islands(roles, group_of)
    cost = defaultdict(lambda: {NCHW: 0.0, NHWC: 0.0})
    outputs = set(graph.outputs)
    # members produced outside their group: a transpose when the group picks the other format
    for v in acts:
        producer = v.producer()
        prole = roles.get(producer) if producer is not None else None
        if prole is not None and prole.kind == "agnostic":
            continue
        made = NHWC if prole is not None and prole.kind == "sensitive" else NCHW
        free = _is_perm(producer, TO_NCHW)  # a transpose back would cancel it
        cost[group_of[v]][NCHW if made == NHWC else NHWC] += 0.0 if free else _nbytes(v)
    # members produced by the group: a transpose per format its outside consumers need
    for v in acts:
        producer = v.producer()
        prole = roles.get(producer) if producer is not None else None
        if prole is None or prole.kind != "agnostic":
            continue
        g = group_of[v]
        needs = {NCHW} if v in outputs else set()
        for use in v.uses():
            urole = roles.get(use.node)
            if urole is None:  # e.g. a node inside a subgraph: reads NCHW
                needs.add(NCHW)
                continue
            if urole.kind == "flat":
                continue
            if urole.kind == "agnostic" and use.idx in urole.acts:
                continue
            needs.add(NHWC if urole.kind == "sensitive" and use.idx in urole.acts else NCHW)
        for f in (NCHW, NHWC):
            if any(n != f for n in needs):
                cost[g][f] += _nbytes(v)
    # values produced outside the group but consumed inside it are counted above through
    # their producer; their non-group consumers need their producer's format: no cost.
    group_fmt = [NCHW] * len(roots)
    for g, c in cost.items():
        if c[NHWC] < c[NCHW]:
            group_fmt[g] = NHWC
    fmt: dict[ir.Value, str] = {}
    for v in acts:
        producer = v.producer()
        prole = roles.get(producer) if producer is not None else None
        if prole is not None and prole.kind == "agnostic":
            fmt[v] = group_fmt[group_of[v]]
        elif prole is not None and prole.kind == "sensitive":
            fmt[v] = NHWC
        else:
            fmt[v] = NCHW
    refusals: dict[str, int] = defaultdict(int)
    for role in roles.values():
        if role.kind == "fixed":
            refusals[role.why] += 1
    node_fmt = {
        node: group_fmt[group_of[node.inputs[role.acts[0]]]]
        for node, role in roles.items()
        if role.kind == "agnostic"
    }
    return LayoutPlan(roles, fmt, group_of, group_fmt, dict(refusals), node_fmt)


# -- the invariant ------------------------------------------------------------------------------


def _native_format(node: ir.Node) -> bool:
    if node.domain == MS_DOMAIN and node.op_type in (
        "QLinearConv",
        "QLinearGlobalAveragePool",
        "QLinearAveragePool",
    ):
        return bool(_attr_int(node, "channels_last", 0))
    return (node.domain == MS_DOMAIN and node.op_type == "NhwcMaxPool") or (
        node.domain == QLINEAR_DOMAIN and node.op_type == "ConvInteger"
    )


def infer_formats(graph: ir.Graph, opset: int) -> dict[ir.Value, str]:
    """The memory format of each rank-4 activation of a (rewritten) graph.

    Graph inputs may be either (ANY: a model may take NHWC input); channels-last
    operators write NHWC; a Transpose with perm
    (0,2,3,1) writes NHWC and (0,3,1,2) NCHW; agnostic nodes write their operands'
    format; other nodes NCHW.
    """
    ranks = Ranks()
    formats: dict[ir.Value, str] = {v: ANY for v in graph.inputs if _is_act4(v, ranks)}
    for node in graph:
        role = classify(node, ranks, opset, custom_ops=True)
        if role.kind == "native":
            out = NHWC
        elif _is_perm(node, TO_NHWC):
            out = NHWC
        elif role.kind == "agnostic":
            seen = {formats.get(node.inputs[i], NCHW) for i in role.acts} - {ANY}
            out = NHWC if NHWC in seen else NCHW if seen else ANY
        else:
            out = NCHW
        for o in node.outputs:
            if _is_act4(o, ranks):
                formats[o] = out
    return formats


def layout_errors(graph: ir.Graph, opset: int) -> list[str]:
    """Every node whose operands disagree on the format, or whose constants do not
    broadcast against its activation's physical shape (empty when the invariant holds)."""
    ranks = Ranks()
    formats = infer_formats(graph, opset)
    errors = []
    for node in graph:
        role = classify(node, ranks, opset, custom_ops=True)
        label = f"node {node.name!r} ({node.domain + '.' if node.domain else ''}{node.op_type})"
        if role.kind == "native":
            x = node.inputs[0]
            if formats.get(x, NHWC) == NCHW:
                errors.append(f"{label}: channels-last operator reads an NCHW value {x.name!r}")
            continue
        if role.kind != "agnostic":
            continue
        seen = {i: formats.get(node.inputs[i], NCHW) for i in role.acts}
        if len(set(seen.values()) - {ANY}) > 1:
            detail = ", ".join(f"{node.inputs[i].name!r}={f}" for i, f in seen.items())
            errors.append(f"{label}: operands in different formats ({detail})")
            continue
        shapes = [_dims(node.inputs[i]) for i in role.acts]
        for i in role.consts:
            arr = constant(node.inputs[i])
            cshape = (1,) * (4 - arr.ndim) + arr.shape
            for shape in shapes:
                if shape is None or len(shape) != 4:
                    continue
                bad = [d for d in range(4) if cshape[d] != 1 and shape[d] not in (None, cshape[d])]
                if bad:
                    errors.append(
                        f"{label}: constant {node.inputs[i].name!r} {tuple(arr.shape)} does not "
                        f"broadcast against {node.inputs[role.acts[0]].name!r} {shape}"
                    )
    return errors


def check_layout(graph: ir.Graph, opset: int) -> None:
    """Raise `LayoutInvariantError` naming each node whose operands disagree on format."""
    errors = layout_errors(graph, opset)
    if errors:
        raise LayoutInvariantError("layout invariant violated:\n  " + "\n  ".join(errors))
