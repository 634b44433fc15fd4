"""Calibration: mergeable streaming statistics and the methods that turn them into ranges."""

from qlinear.calibration.collect import collect
from qlinear.calibration.methods import METHODS, compute_range
from qlinear.calibration.stats import (
    SENTINEL,
    ChannelStats,
    TensorStats,
    load_stats,
    merge_all,
    save_stats,
)

__all__ = [
    "METHODS",
    "SENTINEL",
    "ChannelStats",
    "TensorStats",
    "collect",
    "compute_range",
    "load_stats",
    "merge_all",
    "save_stats",
]
