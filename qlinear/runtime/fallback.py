"""Runs one node through onnx.reference when qlinear has no native kernel for it.

Slow by design; the Session lists every op that took this path so the user
knows where time goes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from qlinear.runtime.registry import Kernel, NodeSpec


def reference_kernel(
    spec: NodeSpec, opsets: dict[str, int], functions: Sequence[onnx.FunctionProto] = ()
) -> Kernel | None:
    """A kernel running `spec`'s node in onnx.reference, or None if it cannot."""
    from onnx.reference import ReferenceEvaluator

    node = spec.proto
    names = [f"in{i}" if name else "" for i, name in enumerate(node.input)]
    outs = [f"out{i}" if name else "" for i, name in enumerate(node.output)]
    renamed = onnx.NodeProto()
    renamed.CopyFrom(node)
    del renamed.input[:]
    del renamed.output[:]
    renamed.input.extend(names)
    renamed.output.extend(outs)
    empty = onnx.TypeProto()
    graph = helper.make_graph(
        [renamed],
        "fallback",
        [helper.make_value_info(n, empty) for n in names if n],
        [helper.make_value_info(n, empty) for n in outs if n],
    )
    try:
        evaluator = ReferenceEvaluator(
            graph, opsets={d or "": v for d, v in opsets.items()}, functions=list(functions)
        )
    except Exception:  # onnx.reference raises many types for "not implemented"
        return None
    present_inputs = [i for i, n in enumerate(names) if n]
    present_outputs = [n for n in outs if n]

    def run(*args: np.ndarray | None) -> list[np.ndarray | None]:
        feeds = {names[i]: args[i] for i in present_inputs}
        values = dict(zip(present_outputs, evaluator.run(None, feeds), strict=True))
        return [values.get(n) if n else None for n in outs]

    return run
