"""Streaming tensor statistics that merge exactly: min/max and a self-widening histogram.

Why this histogram: calibration must be streamed batch by batch (memory bounded by
the model, not the dataset) and sharded statistics must merge into exactly what one
pass gives. Fixed bin edges normally need the range up front (a first min/max pass).
Instead the bins here are anchored at 0 with a **power-of-two width** ``w = 2**k``:
value ``x`` falls in bin index ``floor(x / w)``. Doubling the width maps index ``i``
to ``floor(i / 2)`` -- exactly what direct binning at ``2w`` gives -- so re-binning on
range growth loses nothing. The width is always the smallest power of two for which
the seen range spans at most ``num_bins`` bins (and indices stay below 2**40); that
depends only on the overall min and max, so any split of the data into batches or
shards, merged in any order, ends in the identical histogram. At the final width the
occupied bins number between ``num_bins / 2`` and ``num_bins``.

Non-finite values and *sentinels* (|x| >= ``SENTINEL``, e.g. attention masks built
from float32 lowest, -3.4e38) are counted but kept out of min/max and the
histogram; the quantizer leaves such tensors in float.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

#: Magnitudes at or above this are mask sentinels, not data (float32 max is 3.4e38).
SENTINEL = 1e30
#: Bin indices stay below 2**_MAX_INDEX_BITS in magnitude (int64-safe, exact in float64).
_MAX_INDEX_BITS = 40
#: Smallest bin width exponent: float32's smallest normal.
_MIN_EXP = -126


def _fits(mn: float, mx: float, k: int, num_bins: int) -> bool:
    lo = math.floor(math.ldexp(mn, -k))
    hi = math.floor(math.ldexp(mx, -k))
    return hi - lo + 1 <= num_bins and max(abs(lo), abs(hi)) < 2**_MAX_INDEX_BITS


def width_exponent(mn: float, mx: float, num_bins: int) -> int:
    """Smallest k with range [mn, mx] inside `num_bins` bins of width 2**k (monotone in k)."""
    span = mx - mn
    amax = max(abs(mn), abs(mx))
    k = _MIN_EXP
    if span > 0:
        k = max(k, math.frexp(span / num_bins)[1] - 2)
    if amax > 0:
        k = max(k, math.frexp(amax)[1] - _MAX_INDEX_BITS - 1)
    while not _fits(mn, mx, k, num_bins):
        k += 1
    return k


@dataclass
class TensorStats:
    """Min, max and histogram of every finite, non-sentinel value seen; `merge` is exact.

    ``counts[i]`` holds values in ``[(start + i) * 2**exp, (start + i + 1) * 2**exp)``.
    """

    num_bins: int = 2048
    count: int = 0
    nonfinite: int = 0
    sentinels: int = 0
    min: float = math.inf
    max: float = -math.inf
    exp: int = _MIN_EXP
    start: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    # -- building ------------------------------------------------------------------------

    def update(self, x: np.ndarray) -> None:
        """Add the values of one batch."""
        flat = np.asarray(x).reshape(-1)
        if flat.dtype.kind != "f":
            flat = flat.astype(np.float64)
        finite = np.isfinite(flat)
        n_nonfinite = int(flat.size - np.count_nonzero(finite))
        if n_nonfinite:
            flat = flat[finite]
        big = np.abs(flat) >= SENTINEL
        n_big = int(np.count_nonzero(big))
        if n_big:
            flat = flat[~big]
        self.nonfinite += n_nonfinite
        self.sentinels += n_big
        if flat.size == 0:
            return
        other = TensorStats(self.num_bins)
        other.count = int(flat.size)
        other.min = float(flat.min())
        other.max = float(flat.max())
        other.exp = width_exponent(other.min, other.max, self.num_bins)
        idx = np.floor(np.ldexp(flat.astype(np.float64), -other.exp)).astype(np.int64)
        other.start = math.floor(math.ldexp(other.min, -other.exp))
        other.counts = np.bincount(idx - other.start, minlength=self.num_bins).astype(np.int64)
        self._absorb(other)

    def merge(self, other: TensorStats) -> TensorStats:
        """A new TensorStats holding both; identical to having seen all values in one pass."""
        if other.num_bins != self.num_bins:
            raise ValueError(f"cannot merge {self.num_bins}-bin and {other.num_bins}-bin stats")
        result = self.copy()
        result.nonfinite += other.nonfinite
        result.sentinels += other.sentinels
        if other.count:
            result._absorb(other.copy())
        return result

    def copy(self) -> TensorStats:
        return TensorStats(
            self.num_bins, self.count, self.nonfinite, self.sentinels, self.min, self.max,
            self.exp, self.start, self.counts.copy(),
        )  # fmt: skip

    def _absorb(self, other: TensorStats) -> None:
        if self.count == 0:
            self.count, self.min, self.max = other.count, other.min, other.max
            self.exp, self.start, self.counts = other.exp, other.start, other.counts
            return
        mn, mx = min(self.min, other.min), max(self.max, other.max)
        exp = max(self.exp, other.exp, width_exponent(mn, mx, self.num_bins))
        start = math.floor(math.ldexp(mn, -exp))
        total = self._rebinned(exp, start) + other._rebinned(exp, start)
        self.count += other.count
        self.min, self.max, self.exp, self.start, self.counts = mn, mx, exp, start, total

    def _rebinned(self, exp: int, start: int) -> np.ndarray:
        """Counts at the coarser width 2**exp, re-based to `start` (exact: floor of floor)."""
        shift = exp - self.exp
        idx = (np.arange(self.num_bins, dtype=np.int64) + self.start) >> shift
        nz = np.flatnonzero(self.counts)
        out = np.zeros(self.num_bins, np.int64)
        np.add.at(out, idx[nz] - start, self.counts[nz])
        return out

    # -- reading -------------------------------------------------------------------------

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.exp)

    def edges(self) -> np.ndarray:
        """The num_bins + 1 bin edges (float64)."""
        return np.ldexp(np.arange(self.num_bins + 1, dtype=np.float64) + self.start, self.exp)

    def centers(self) -> np.ndarray:
        """Bin centres clipped to the observed [min, max] (the first/last bins are partial)."""
        e = self.edges()
        return np.clip((e[:-1] + e[1:]) / 2, self.min, self.max)

    @property
    def has_sentinels(self) -> bool:
        return self.sentinels > 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorStats):
            return NotImplemented
        return (
            self.num_bins == other.num_bins
            and self.count == other.count
            and self.nonfinite == other.nonfinite
            and self.sentinels == other.sentinels
            and (self.count == 0 or (self.min, self.max, self.exp, self.start)
                 == (other.min, other.max, other.exp, other.start))
            and (self.count == 0 or np.array_equal(self.counts, other.counts))
        )  # fmt: skip


@dataclass
class ChannelStats:
    """Per-channel (last axis) absolute max and sum: SmoothQuant and bias correction inputs.

    The absolute max merges exactly; the sum is float64 (merge is exact up to rounding).
    """

    absmax: np.ndarray | None = None
    total: np.ndarray | None = None
    rows: int = 0

    def update(self, x: np.ndarray, axis: int = -1) -> None:
        x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
        x = x.reshape(-1, x.shape[-1])
        x = np.where(np.abs(x) < SENTINEL, x, 0.0)
        self._add(np.abs(x).max(axis=0), x.sum(axis=0), x.shape[0])

    def _add(self, absmax: np.ndarray, total: np.ndarray, rows: int) -> None:
        if self.absmax is None or self.total is None:
            self.absmax, self.total, self.rows = absmax.copy(), total.copy(), rows
            return
        if absmax.shape != self.absmax.shape:
            raise ValueError(f"channel count changed: {self.absmax.shape} vs {absmax.shape}")
        self.absmax = np.maximum(self.absmax, absmax)
        self.total = self.total + total
        self.rows += rows

    def merge(self, other: ChannelStats) -> ChannelStats:
        out = ChannelStats()
        for part in (self, other):
            if part.absmax is not None and part.total is not None:
                out._add(part.absmax, part.total, part.rows)
        return out

    @property
    def mean(self) -> np.ndarray:
        if self.total is None or self.rows == 0:
            raise ValueError("no values seen")
        return self.total / self.rows


def merge_all(shards: list[dict[str, TensorStats]]) -> dict[str, TensorStats]:
    """Merge per-tensor statistics from several shards (processes, machines)."""
    out: dict[str, TensorStats] = {}
    for shard in shards:
        for name, stats in shard.items():
            out[name] = out[name].merge(stats) if name in out else stats.copy()
    return out


def save_stats(stats: dict[str, TensorStats], path: str) -> None:
    """Write per-tensor statistics to one .npz (for merging shards from other machines)."""
    arrays: dict[str, np.ndarray] = {}
    for i, (name, s) in enumerate(stats.items()):
        head = [s.num_bins, s.count, s.nonfinite, s.sentinels, s.exp, s.start]
        arrays[f"{i}/name"] = np.array(name)
        arrays[f"{i}/head"] = np.array(head, np.int64)
        arrays[f"{i}/range"] = np.array([s.min, s.max], np.float64)
        arrays[f"{i}/counts"] = s.counts
    np.savez(path, **arrays)


def load_stats(path: str) -> dict[str, TensorStats]:
    """Read statistics written by `save_stats`."""
    out: dict[str, TensorStats] = {}
    with np.load(path, allow_pickle=False) as data:
        n = len({k.split("/")[0] for k in data.files})
        for i in range(n):
            nb, count, nonfinite, sentinels, exp, start = (int(v) for v in data[f"{i}/head"])
            mn, mx = (float(v) for v in data[f"{i}/range"])
            out[str(data[f"{i}/name"])] = TensorStats(
                nb, count, nonfinite, sentinels, mn, mx, exp, start, data[f"{i}/counts"].copy()
            )
    return out
