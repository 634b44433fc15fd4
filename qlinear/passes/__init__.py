"""Graph optimizer: QDQ models => fused QLinear/int8 operators (design §3).

``optimize(model)`` runs the ordered pass list in `pipeline`; each pass module holds
one rule family (see its docstring) on onnx-ir's pass infrastructure.
"""

from qlinear.passes._infra import REPLACES_KEY, ExplainLog
from qlinear.passes.explain import explain, fusion_counts
from qlinear.passes.layout import LayoutPass
from qlinear.passes.layout_analysis import LayoutInvariantError, check_layout
from qlinear.passes.pipeline import (
    DEFAULT_LAYOUT,
    default_passes,
    fold_float,
    optimize,
    run_passes,
)

__all__ = [
    "DEFAULT_LAYOUT",
    "LayoutInvariantError",
    "LayoutPass",
    "check_layout",
    "REPLACES_KEY",
    "ExplainLog",
    "default_passes",
    "explain",
    "fold_float",
    "fusion_counts",
    "optimize",
    "run_passes",
]
