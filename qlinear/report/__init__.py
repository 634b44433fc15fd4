"""Compare two models on the same data, per output and per layer, and report it.

``compare`` measures; ``text`` / ``markdown`` / ``charts`` present; ``suggest``
turns the measurements into advice; ``matching`` and ``isolate`` find and cut the
layers.
"""

from qlinear.report.compare import CompareResult, LayerResult, OutputResult, compare
from qlinear.report.markdown import write_report
from qlinear.report.metrics import ErrorStats, cosine, max_abs_error, sqnr_db, top1_agreement
from qlinear.report.suggest import Suggestion, suggest

__all__ = [
    "CompareResult",
    "ErrorStats",
    "LayerResult",
    "OutputResult",
    "Suggestion",
    "compare",
    "cosine",
    "max_abs_error",
    "sqnr_db",
    "suggest",
    "top1_agreement",
    "write_report",
]
