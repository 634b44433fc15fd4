"""Error metrics between a reference tensor and a test tensor, accumulated over batches.

There is one implementation of each metric: ``ErrorStats`` keeps running sums
(signal energy, noise energy, dot product, norms, max error, top-1 hits) so a
metric over a whole dataset is exact, not an average of per-batch numbers.
The one-shot helpers (``sqnr_db`` ...) feed a single pair through it.

SQNR is ``10·log10(Σref² / Σ(ref − test)²)`` in dB; identical tensors give
``inf`` ("exact"); a zero reference with a non-zero test gives ``-inf``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class ErrorStats:
    """Running sums from which every metric is derived."""

    count: int = 0
    signal: float = 0.0  # Σ ref²
    noise: float = 0.0  # Σ (ref - test)²
    test_energy: float = 0.0  # Σ test²
    dot: float = 0.0  # Σ ref·test
    max_abs: float = 0.0
    top1_hits: int = 0
    top1_total: int = 0
    nonfinite: int = 0

    def update(self, ref: np.ndarray, test: np.ndarray, *, classifier: bool = False) -> ErrorStats:
        """Add one batch; `classifier` also counts top-1 agreement along the last axis."""
        ref = np.asarray(ref)
        test = np.asarray(test)
        if ref.shape != test.shape:
            raise ValueError(f"cannot compare tensors of shapes {ref.shape} and {test.shape}")
        r = ref.astype(np.float64, copy=False).reshape(-1)
        t = test.astype(np.float64, copy=False).reshape(-1)
        finite = np.isfinite(r) & np.isfinite(t)
        if not finite.all():
            self.nonfinite += int((~finite).sum())
            r, t = r[finite], t[finite]
        diff = r - t
        self.count += r.size
        self.signal += float(r @ r)
        self.noise += float(diff @ diff)
        self.test_energy += float(t @ t)
        self.dot += float(r @ t)
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.abs(diff).max()))
        if classifier and ref.ndim >= 1 and ref.size:
            a = ref.reshape(-1, ref.shape[-1]).argmax(axis=-1)
            b = test.reshape(-1, test.shape[-1]).argmax(axis=-1)
            self.top1_hits += int((a == b).sum())
            self.top1_total += int(a.size)
        return self

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    @property
    def cosine(self) -> float:
        norm = math.sqrt(self.signal) * math.sqrt(self.test_energy)
        if norm == 0.0:
            return 1.0 if self.signal == self.test_energy else 0.0
        return max(-1.0, min(1.0, self.dot / norm))

    @property
    def top1(self) -> float | None:
        """Fraction of rows whose argmax agrees (None when not a classifier output)."""
        return self.top1_hits / self.top1_total if self.top1_total else None

    @property
    def exact(self) -> bool:
        return self.noise == 0.0 and self.nonfinite == 0


def is_classifier(value: np.ndarray) -> bool:
    """A 2-D float [N, classes] output with at least 2 classes: top-1 agreement applies."""
    return value.ndim == 2 and value.dtype.kind == "f" and value.shape[1] >= 2


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    return ErrorStats().update(ref, test).sqnr_db


def cosine(ref: np.ndarray, test: np.ndarray) -> float:
    return ErrorStats().update(ref, test).cosine


def max_abs_error(ref: np.ndarray, test: np.ndarray) -> float:
    return ErrorStats().update(ref, test).max_abs


def top1_agreement(ref: np.ndarray, test: np.ndarray) -> float:
    stats = ErrorStats().update(ref, test, classifier=True)
    return stats.top1 if stats.top1 is not None else math.nan


def format_db(value: float) -> str:
    """SQNR for people: 'exact' for identical tensors, one decimal otherwise."""
    if value == math.inf:
        return "exact"
    if value == -math.inf:
        return "-inf"
    return f"{value:.1f}"


def outlier_ratio(values: np.ndarray) -> float:
    """max|x| / 99.9th percentile of |x|: how far the extreme values sit from the bulk."""
    a = np.abs(np.asarray(values, dtype=np.float64).reshape(-1))
    a = a[np.isfinite(a)]
    if a.size == 0:
        return 1.0
    p = float(np.percentile(a, 99.9))
    peak = float(a.max())
    if p == 0.0:
        return math.inf if peak > 0 else 1.0
    return peak / p


def channel_range_ratio(weight: np.ndarray, axis: int = 0) -> float:
    """max/min over output channels of each channel's max|w|: per-tensor scale waste."""
    w = np.abs(np.asarray(weight, dtype=np.float64))
    if w.ndim < 2:
        return 1.0
    ranges = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).max(axis=1)
    lo, hi = float(ranges.min()), float(ranges.max())
    if lo == 0.0:
        return math.inf if hi > 0 else 1.0
    return hi / lo
