"""`--explain`: per node unit, which rule fired or why none did."""

from __future__ import annotations

from collections import Counter
from typing import Any

import onnx

from qlinear.onnx_io import ModelLike
from qlinear.passes._infra import REPLACES_KEY, ExplainLog
from qlinear.passes.pipeline import optimize

#: Ops that should never be left float in a quantized model.
LINEAR_OPS = ("Conv", "MatMul", "Gemm")


def explain(model: ModelLike, **options: Any) -> tuple[onnx.ModelProto, list[str]]:
    """Optimize `model` (options as `optimize`) and return it with one line per node unit."""
    log = ExplainLog()
    optimized = optimize(model, log=log, **options)
    return optimized, log.lines()


def fusion_counts(original: onnx.ModelProto, optimized: onnx.ModelProto) -> dict[str, int]:
    """Conv/MatMul/Gemm nodes before, fused and left float (by op type in each graph)."""
    before = Counter(n.op_type for n in original.graph.node if n.domain in ("", "ai.onnx"))
    after = Counter(n.op_type for n in optimized.graph.node if n.domain in ("", "ai.onnx"))
    total = sum(before[o] for o in LINEAR_OPS)
    left = sum(after[o] for o in LINEAR_OPS)
    fused = sum(
        1
        for n in optimized.graph.node
        if any(p.key == REPLACES_KEY for p in n.metadata_props)
        and n.op_type in ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat")
    )
    return {"linear": total, "fused": fused, "left_float": left}
