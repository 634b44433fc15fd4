"""What would likely fix the worst layers, from statistics the compare run measured.

Rules live in one table. Each rule reads one measured number from a layer and
fires when it crosses the rule's threshold; the suggestion quotes that number so
the user can judge it. Rules only look at the worst layers (by own error).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qlinear.report.metrics import channel_range_ratio

if TYPE_CHECKING:
    from qlinear.report.compare import CompareResult, LayerResult

_MATMUL_OPS = {"MatMul", "Gemm", "QLinearMatMul", "QGemm", "MatMulInteger"}


def _per_tensor_spread(layer: LayerResult, _: CompareResult) -> float | None:
    w = layer.weight
    if w is None or w.per_channel:
        return None
    return channel_range_ratio(w.values, w.channel_axis)


def _input_outliers(layer: LayerResult, result: CompareResult) -> float | None:
    if layer.match.op_a not in _MATMUL_OPS and layer.match.op_b not in _MATMUL_OPS:
        return None
    by_name = {r.name: r for r in result.layers}
    ratios = [by_name[k].outlier_ratio for k in layer.match.inputs if k in by_name]
    return max(ratios) if ratios else None


def _output_outliers(layer: LayerResult, _: CompareResult) -> float | None:
    return layer.outlier_ratio


def _own_sqnr(layer: LayerResult, _: CompareResult) -> float | None:
    return layer.own.sqnr_db if math.isfinite(layer.own.sqnr_db) else None


def _shown(value: float) -> str:
    """A measure as the reason quotes it ("inf" read as "infx": a channel of zeros)."""
    return f"{value:.1f}" if math.isfinite(value) else "∞ (an all-zero channel)"


@dataclass(frozen=True)
class Rule:
    name: str
    measure: Callable[[LayerResult, CompareResult], float | None]
    threshold: float
    above: bool  # fire when the measure is above (True) or below (False) the threshold
    action: str
    reason: str  # formatted with {value} and {threshold}


RULES: tuple[Rule, ...] = (
    Rule(
        "per_channel_weights", _per_tensor_spread, 4.0, True,
        "quantize this layer's weights per channel",
        "weights are per-tensor and output-channel ranges differ by max/min = {value}x "
        "(> {threshold:g}x)",
    ),
    Rule(
        "smoothquant", _input_outliers, 8.0, True,
        "apply SmoothQuant to this MatMul",
        "its input activation has outliers: max/p99.9 = {value} (> {threshold:g})",
    ),
    Rule(
        "int16_activations", _output_outliers, 8.0, True,
        "use int16 activations (or percentile calibration) for this tensor",
        "activation range is set by outliers: max/p99.9 = {value} (> {threshold:g})",
    ),
    Rule(
        "exclude_node", _own_sqnr, 20.0, False,
        "exclude this node from quantization (keep it in float)",
        "it alone brings SQNR down to {value} dB (< {threshold:g} dB)",
    ),
)  # fmt: skip


@dataclass(frozen=True)
class Suggestion:
    tensor: str
    op_type: str
    rule: str
    action: str
    reason: str
    value: float
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        value = self.value if math.isfinite(self.value) else str(self.value)
        return {
            "tensor": self.tensor,
            "op_type": self.op_type,
            "rule": self.rule,
            "action": self.action,
            "reason": self.reason,
            "value": value,
            "threshold": self.threshold,
        }


def suggest(result: CompareResult, worst: int = 5) -> list[Suggestion]:
    """Suggestions for the `worst` layers by own error (exact layers are skipped)."""
    found = []
    for layer in result.worst_layers(worst):
        if layer.own.exact:
            continue
        for rule in RULES:
            value = rule.measure(layer, result)
            if value is None:
                continue
            fired = value > rule.threshold if rule.above else value < rule.threshold
            if fired:
                found.append(
                    Suggestion(
                        tensor=layer.name,
                        op_type=layer.match.op_a,
                        rule=rule.name,
                        action=rule.action,
                        reason=rule.reason.format(value=_shown(value),
                                                  threshold=rule.threshold),
                        value=value,
                        threshold=rule.threshold,
                    )
                )
    return found
