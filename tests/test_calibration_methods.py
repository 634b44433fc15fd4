"""Calibration methods pick sensible ranges from the histogram."""

from __future__ import annotations

import numpy as np
import pytest

from qlinear.calibration import METHODS, TensorStats, compute_range


def _stats(x: np.ndarray) -> TensorStats:
    s = TensorStats()
    s.update(x)
    return s


@pytest.fixture
def outlier_stats() -> TensorStats:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 200_000), [40.0, -35.0]]).astype(np.float32)
    return _stats(x)


def test_minmax_is_the_observed_range(outlier_stats: TensorStats) -> None:
    assert compute_range(outlier_stats, "minmax") == (-35.0, 40.0)


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_clipping_methods_drop_outliers(outlier_stats: TensorStats, method: str) -> None:
    lo, hi = compute_range(outlier_stats, method, np.uint8, percentile=99.99)
    assert -35.0 <= lo < -2.5 and 2.5 < hi <= 40.0
    assert hi < 30 and lo > -30


@pytest.mark.parametrize("method", METHODS)
def test_nonnegative_data_keeps_zero_lower_bound(method: str) -> None:
    x = np.abs(np.random.default_rng(1).normal(0, 1, 50_000)).astype(np.float32)
    lo, hi = compute_range(_stats(x), method, np.uint8)
    assert lo >= 0 and 1.5 < hi <= x.max()


@pytest.mark.parametrize("method", METHODS)
def test_zero_range_returns_the_value(method: str) -> None:
    assert compute_range(_stats(np.full(10, 2.0, np.float32)), method) == (2.0, 2.0)


def test_empty_stats_and_unknown_method_raise() -> None:
    with pytest.raises(ValueError, match="no finite values"):
        compute_range(TensorStats(), "minmax")
    with pytest.raises(ValueError, match="unknown calibration method"):
        compute_range(_stats(np.arange(4.0)), "magic")
