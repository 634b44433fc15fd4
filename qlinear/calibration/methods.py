"""Calibration methods: a `TensorStats` histogram -> the range [lo, hi] to quantize.

- ``minmax``: the observed range; nothing clips.
- ``percentile``: drop the outer ``100 - p`` percent (two-sided; one-sided if the
  data does not cross zero).
- ``entropy``: TensorRT's KL-divergence search over thresholds of |x|.
- ``mse``: the clipping range that minimises the expected squared quantization error
  over the histogram, with the real quantizer (qlinear.quant) in the loop.

All of them return a float range; turning it into a scale and zero point is
``qlinear.quant.choose_qparams``'s job (one implementation of that arithmetic).
"""

from __future__ import annotations

import numpy as np

from qlinear.calibration.stats import TensorStats
from qlinear.quant import choose_qparams, dequantize_affine, quant_dtype, quantize_affine

Range = tuple[float, float]
METHODS = ("minmax", "percentile", "entropy", "mse")


def compute_range(
    stats: TensorStats,
    method: str,
    dtype: object = np.uint8,
    *,
    symmetric: bool = False,
    percentile: float = 99.999,
) -> Range:
    """The range `method` picks for a tensor whose values `stats` summarises."""
    if stats.count == 0:
        raise ValueError("no finite values were seen for this tensor")
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {METHODS}")
    if stats.min == stats.max or method == "minmax":
        return stats.min, stats.max
    if method == "percentile":
        return _percentile(stats, percentile, symmetric)
    if method == "entropy":
        return _entropy(stats, dtype)
    return _mse(stats, dtype, symmetric)


def _percentile(stats: TensorStats, p: float, symmetric: bool) -> Range:
    edges = stats.edges()
    if symmetric or (stats.min < 0 < stats.max):
        if symmetric:
            hist, abs_edges = _abs_histogram(stats)
            t = _quantile(hist, abs_edges, p / 100)
            return max(stats.min, -t), min(stats.max, t)
        tail = (1 - p / 100) / 2
        lo = _quantile(stats.counts, edges, tail)
        hi = _quantile(stats.counts, edges, 1 - tail)
        return max(stats.min, lo), min(stats.max, hi)
    if stats.min >= 0:
        return stats.min, min(stats.max, _quantile(stats.counts, edges, p / 100))
    return max(stats.min, _quantile(stats.counts, edges, 1 - p / 100)), stats.max


def _quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    cdf = np.cumsum(counts, dtype=np.float64)
    target = q * cdf[-1]
    i = int(np.searchsorted(cdf, target, side="left"))
    i = min(i, len(counts) - 1)
    return float(edges[i + 1])


def _abs_histogram(stats: TensorStats) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of |x| at the same width: bin i<0 ([i w, (i+1) w)) lands in |x| bin -i-1."""
    idx = np.arange(stats.num_bins, dtype=np.int64) + stats.start
    abs_idx = np.where(idx < 0, -idx - 1, idx)
    n = int(abs_idx.max()) + 1
    hist = np.bincount(abs_idx, weights=stats.counts, minlength=n)
    edges = np.ldexp(np.arange(n + 1, dtype=np.float64), stats.exp)
    return hist, edges


def _entropy(stats: TensorStats, dtype: object) -> Range:
    hist, edges = _abs_histogram(stats)
    hist = hist.copy()
    hist[0] = 0  # the spike at zero (Relu outputs, padding) would dominate the divergence
    qd = quant_dtype(dtype)
    levels = 2 ** (qd.bits - 1) if (qd.signed or stats.min < 0) else 2**qd.bits
    t = _kl_threshold(hist, edges, levels)
    return max(stats.min, -t), min(stats.max, t)


def _kl_threshold(hist: np.ndarray, edges: np.ndarray, levels: int) -> float:
    """TensorRT's search: the |x| threshold whose clipped, `levels`-bin histogram is closest."""
    n = len(hist)
    if n <= levels:
        return float(edges[-1])
    best, best_i = np.inf, n
    candidates = range(levels, n + 1, max(1, (n - levels) // 256))
    for i in candidates:
        ref = hist[:i].astype(np.float64).copy()
        ref[i - 1] += hist[i:].sum()
        nonzero = hist[:i] != 0
        # quantize the first i bins into `levels` groups, spreading counts over nonzeros
        groups = np.minimum((np.arange(i) * levels) // i, levels - 1)
        gsum = np.bincount(groups, weights=hist[:i], minlength=levels)
        gnz = np.bincount(groups, weights=nonzero.astype(np.float64), minlength=levels)
        q = np.where(nonzero, gsum[groups] / np.maximum(gnz[groups], 1), 0.0)
        p = ref / ref.sum()
        qs = q.sum()
        if qs == 0:
            continue
        q = q / qs
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best:
            best, best_i = kl, i
    return float(edges[best_i])


def _mse(stats: TensorStats, dtype: object, symmetric: bool, steps: int = 100) -> Range:
    """Shrink both ends by one factor (1 .. 0.05), then each end alone (1 .. 0.5); keep the
    candidate with the least histogram-weighted squared error. Candidates are evaluated
    together: one QuantParams with a per-candidate scale over [candidates, bins]."""
    nz = stats.counts > 0
    centers = stats.centers().astype(np.float32)[nz]
    weights = stats.counts[nz].astype(np.float64)

    def best(lo: np.ndarray, hi: np.ndarray) -> tuple[float, float, float]:
        qp = choose_qparams(lo[:, None], hi[:, None], dtype, symmetric=symmetric)
        grid = np.broadcast_to(centers, (lo.size, centers.size))
        deq = dequantize_affine(quantize_affine(grid, qp), qp).astype(np.float64)
        err = ((deq - centers) ** 2) @ weights
        i = int(np.argmin(err))
        return float(err[i]), float(lo[i]), float(hi[i])

    f = np.linspace(1.0, 0.05, steps)
    err, lo, hi = best(stats.min * f, stats.max * f)
    g = np.linspace(1.0, 0.5, steps // 4)[1:]
    one_sided = best(
        np.concatenate([lo * g, np.full(g.size, lo)]),
        np.concatenate([np.full(g.size, hi), hi * g]),
    )
    if one_sided[0] < err:
        _, lo, hi = one_sided
    return lo, hi
