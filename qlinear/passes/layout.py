"""The NHWC layout pass: analysis (`layout_analysis`) + rewrite (`layout_rewrite`) + check.

Rules (design §3 Layout):

- QLinearConv => com.microsoft.QLinearConv channels_last=1; int8/uint8 MaxPool =>
  com.microsoft.NhwcMaxPool; com.microsoft.QLinearGlobalAveragePool => channels_last=1;
  with ``custom_ops=True`` also ConvInteger => ai.qlinear.ConvInteger channels_last=1
  (dynamic quantization; such a model no longer loads in onnxruntime). Float Conv and
  pools stay NCHW: onnxruntime's CPU provider has no NhwcConv.
- Elementwise ops, Q/DQ, Concat/Softmax/Reduce/Resize follow their operands; per-channel
  constants are permuted and axes remapped, so all operands of a node agree.
- Transposes only at format boundaries, one per value and format; cancelling pairs go.
- After rewriting, the invariant is checked: every node's operands share one format
  and its constants broadcast against its activations (`LayoutInvariantError` names
  the node otherwise).

A second run finds nothing left to convert and changes nothing.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir import passes

from qlinear.passes._infra import REPLACES_KEY, ExplainLog
from qlinear.passes.layout_analysis import (
    LayoutInvariantError,
    LayoutPlan,
    check_layout,
    plan_layout,
)
from qlinear.passes.layout_rewrite import apply_layout, cancel_transposes

LAYOUTS = ("nchw", "nhwc")
_LOGGED = frozenset(
    {
        "Conv",
        "QLinearConv",
        "ConvInteger",
        "MaxPool",
        "QLinearGlobalAveragePool",
        "QLinearAveragePool",
        "AveragePool",
        "GlobalAveragePool",
    }
)


def _check_wiring(plan: LayoutPlan) -> None:
    """Every activation input now reads a value in the format its node needs."""
    bad = []
    for node in plan.roles:
        if node.graph is None:
            continue
        for i, value in enumerate(node.inputs):
            need = plan.required(node, i)
            have = None if value is None else value.meta.get("qlinear.layout")
            if need is not None and have is not None and have != need:
                bad.append(
                    f"node {node.name!r} ({node.op_type}) input {i} "
                    f"{value.name!r} is {have}, needs {need}"
                )
    if bad:
        raise LayoutInvariantError("layout rewrite left mixed formats:\n  " + "\n  ".join(bad))


class LayoutPass(passes.InPlacePass):
    """Run Conv/Pool and their quantized forms channels-last (NHWC); see module docstring."""

    def __init__(self, log: ExplainLog | None = None, *, custom_ops: bool = False) -> None:
        super().__init__()
        self.log = log
        self.custom_ops = custom_ops
        self.plan: LayoutPlan | None = None

    def call(self, model: ir.Model) -> passes.PassResult:
        graph = model.graph
        opset = graph.opset_imports.get("", 13)
        plan = plan_layout(graph, opset, custom_ops=self.custom_ops)
        self.plan = plan
        if self.log is not None:
            self._explain(plan)
        changes = apply_layout(graph, plan)
        if changes:
            _check_wiring(plan)
        changes += cancel_transposes(graph)
        if changes:
            check_layout(graph, opset)
        return passes.PassResult(model, bool(changes))

    def _explain(self, plan: LayoutPlan) -> None:
        """--explain: which convolutions/pools went channels-last, and why others did not
        (appended to the unit's fusion record when there is one)."""
        for node, role in plan.roles.items():
            if node.op_type not in _LOGGED or role.kind not in ("sensitive", "fixed"):
                continue
            what = (
                "LayoutPass: channels-last"
                if role.kind == "sensitive"
                else f"LayoutPass: stays NCHW ({role.why})"
            )
            key = node.meta.get(REPLACES_KEY) or (node.outputs[0].name if node.outputs else "?")
            unit = self.log.units.get(key)
            if unit is not None and unit.fired:
                self.log.fired(node, f"{unit.fired}; {what}")
            elif role.kind == "sensitive":
                self.log.fired(node, what)
            else:
                self.log.refused(node, "LayoutPass", role.why)
