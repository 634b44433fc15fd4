"""Layout rewrite: apply a `LayoutPlan` (where transposes go, what each node becomes).

Why it only applies decisions: every format was fixed by `layout_analysis.plan_layout`
on the unchanged graph, so rewiring one consumer can never leave another consumer of
the same value behind (see the analysis docstring). Steps, in order:

1. at every input whose required format differs from the value's, read a converted
   copy instead: one Transpose per (value, format), cached, placed after the producer;
2. graph outputs stay NCHW under their original names;
3. sensitive nodes become their channels-last forms; agnostic nodes running NHWC get
   permuted constant operands (one copy per constant) and remapped axes;
4. value shapes are permuted to the physical layout;
5. Transpose pairs that cancel are removed (`cancel_transposes`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qlinear.passes._infra import MS_DOMAIN, add_initializer, ensure_opset, fresh_name
from qlinear.passes.layout_analysis import (
    LAYOUT_KEY,
    NCHW,
    NHWC,
    QLINEAR_DOMAIN,
    TO_NCHW,
    TO_NHWC,
    LayoutPlan,
    constant,
)


def _permute_shape(shape: ir.Shape | None, perm: tuple[int, ...]) -> ir.Shape | None:
    if shape is None or len(shape) != len(perm):
        return shape
    dims = list(shape)
    return ir.Shape([dims[p] for p in perm])


def _to_nhwc_axis(axis: int) -> int:
    return TO_NHWC.index(axis % 4)


class _Rewriter:
    def __init__(self, graph: ir.Graph, plan: LayoutPlan) -> None:
        self.graph = graph
        self.plan = plan
        self.converted: dict[tuple[ir.Value, str], ir.Value] = {}
        self.permuted: dict[ir.Value, ir.Value] = {}
        self.shapes = {v: v.shape for v in plan.fmt}
        self.changes = 0

    # -- 1, 2: transposes at boundaries -------------------------------------------------

    def convert(self, value: ir.Value, target: str) -> ir.Value:
        key = (value, target)
        if key in self.converted:
            return self.converted[key]
        perm = TO_NHWC if target == NHWC else TO_NCHW
        node = ir.node("Transpose", [value], {"perm": list(perm)})
        node.name = fresh_name("layout_transpose")
        node.metadata_props[LAYOUT_KEY] = f"to_{target.lower()}"
        out = node.outputs[0]
        out.name = fresh_name(f"{value.name or 'v'}_{target.lower()}")
        out.type = value.type
        logical = self.shapes.get(value, value.shape)
        out.shape = _permute_shape(logical, TO_NHWC) if target == NHWC else logical
        out.meta[LAYOUT_KEY] = target
        producer = value.producer()
        if producer is not None:
            self.graph.insert_after(producer, node)
        else:
            self.graph.insert_before(self.graph[0], node)
        self.converted[key] = out
        self.changes += 1
        return out

    def rewire(self) -> None:
        for value, fmt in list(self.plan.fmt.items()):
            for use in list(value.uses()):
                node = use.node
                # a consumer the plan does not know (e.g. inside a subgraph) reads NCHW
                need = self.plan.required(node, use.idx) if node in self.plan.roles else NCHW
                if need is not None and need != fmt:
                    node.replace_input_with(use.idx, self.convert(value, need))
        for i, value in enumerate(list(self.graph.outputs)):
            if self.plan.fmt.get(value) == NHWC:
                out = self.convert(value, NCHW)
                name = value.name
                value.name = fresh_name(name or "v")
                out.name = name
                self.graph.outputs[i] = out

    # -- 3: nodes ---------------------------------------------------------------------------

    def convert_node(self, node: ir.Node) -> None:
        op = node.op_type
        if op == "QLinearConv":
            node.domain = MS_DOMAIN
            ensure_opset(self.graph, MS_DOMAIN, 1)
        elif op == "ConvInteger":
            node.domain = QLINEAR_DOMAIN
            ensure_opset(self.graph, QLINEAR_DOMAIN, 1)
        elif op == "MaxPool":
            node.domain = MS_DOMAIN
            node.op_type = "NhwcMaxPool"
            node.attributes.pop("storage_order", None)
            ensure_opset(self.graph, MS_DOMAIN, 1)
        if node.op_type != "NhwcMaxPool":
            node.attributes["channels_last"] = ir.AttrInt64("channels_last", 1)
        self.changes += 1

    def permute_constant(self, value: ir.Value) -> ir.Value:
        if value not in self.permuted:
            arr = constant(value)
            full = arr.reshape((1,) * (4 - arr.ndim) + arr.shape)
            new = add_initializer(
                self.graph,
                np.ascontiguousarray(full.transpose(TO_NHWC)),
                f"{value.name or 'const'}_nhwc",
            )
            new.meta[LAYOUT_KEY] = NHWC
            self.permuted[value] = new
        return self.permuted[value]

    def vector_input(self, node: ir.Node, index: int, fn) -> None:
        value = node.inputs[index] if index < len(node.inputs) else None
        arr = None if value is None else constant(value)
        if arr is None or arr.size == 0:
            return
        new = add_initializer(self.graph, fn(arr), f"{value.name or 'v'}_nhwc")
        node.replace_input_with(index, new)

    def agnostic_node(self, node: ir.Node) -> None:
        role = self.plan.roles[node]
        for i in role.consts:
            node.replace_input_with(i, self.permute_constant(node.inputs[i]))
        attrs = node.attributes
        if role.remap == "axis":
            attrs["axis"] = ir.AttrInt64(
                "axis", _to_nhwc_axis(attrs["axis"].as_int() if "axis" in attrs else -1)
            )
        elif role.remap == "qdq_axis":
            attrs["axis"] = ir.AttrInt64(
                "axis", _to_nhwc_axis(attrs["axis"].as_int() if "axis" in attrs else 1)
            )
        elif role.remap == "axes":
            axes = sorted(_to_nhwc_axis(a) for a in attrs["axes"].as_ints())
            attrs["axes"] = ir.AttrInt64s("axes", axes)
        elif role.remap == "axes_input":
            self.vector_input(
                node,
                1,
                lambda a: np.array(sorted(_to_nhwc_axis(int(x)) for x in a.reshape(-1)), np.int64),
            )
        elif role.remap == "resize":

            def perm(a: np.ndarray) -> np.ndarray:
                return np.ascontiguousarray(a[list(TO_NHWC)])

            def perm_roi(a: np.ndarray) -> np.ndarray:
                return np.concatenate([a[:4][list(TO_NHWC)], a[4:][list(TO_NHWC)]])

            self.vector_input(node, 1, perm_roi)
            self.vector_input(node, 2, perm)
            self.vector_input(node, 3, perm)
        self.changes += 1

    def run(self) -> int:
        self.rewire()
        for node, role in self.plan.roles.items():
            if role.kind == "sensitive":
                self.convert_node(node)
            elif role.kind == "agnostic" and self.plan.node_format(node) == NHWC:
                self.agnostic_node(node)
        for value, fmt in self.plan.fmt.items():
            value.meta[LAYOUT_KEY] = fmt
            if fmt == NHWC:
                value.shape = _permute_shape(self.shapes[value], TO_NHWC)
                producer = value.producer()
                if producer is not None:  # saved, so compare knows the value is channels-last
                    producer.metadata_props[LAYOUT_KEY] = NHWC
        return self.changes


def apply_layout(graph: ir.Graph, plan: LayoutPlan) -> int:
    """Apply `plan` to `graph` in place; the number of changes made (0: nothing to do)."""
    if not plan.converts:
        return 0
    return _Rewriter(graph, plan).run()


def _perm(node: ir.Node) -> tuple[int, ...] | None:
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return None
    attr = node.attributes.get("perm")
    return None if attr is None else tuple(attr.as_ints())


def cancel_transposes(graph: ir.Graph) -> int:
    """Fold Transpose(Transpose(x)) into one (or none when they cancel); count of folds."""
    folded = 0
    for node in list(graph):
        outer = _perm(node)
        inner_node = node.inputs[0].producer() if outer is not None and node.inputs else None
        inner = _perm(inner_node) if inner_node is not None else None
        if outer is None or inner is None or len(inner) != len(outer):
            continue
        x = inner_node.inputs[0]
        combined = tuple(inner[p] for p in outer)
        out = node.outputs[0]
        if combined == tuple(range(len(combined))):
            if out.is_graph_output():
                if x.is_graph_input() or x.is_graph_output() or x.producer() is None:
                    continue
                name = out.name
                out.replace_all_uses_with(x, replace_graph_outputs=True)
                out.name = fresh_name(name or "dead")
                x.name = name
            else:
                out.replace_all_uses_with(x)
        else:
            node.replace_input_with(0, x)
            node.attributes["perm"] = ir.AttrInt64s("perm", list(combined))
        folded += 1
    return folded
