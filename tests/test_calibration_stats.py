"""Streaming statistics: exact merges, bounded memory, sentinels and zero ranges."""

from __future__ import annotations

import tracemalloc

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qlinear.calibration import SENTINEL, TensorStats, merge_all
from qlinear.calibration.collect import collect


def _one_pass(batches: list[np.ndarray], bins: int = 64) -> TensorStats:
    s = TensorStats(bins)
    for b in batches:
        s.update(b)
    return s


@settings(max_examples=60)
@given(
    st.lists(
        st.tuples(st.floats(-1e3, 1e3), st.floats(1e-3, 1e3), st.integers(1, 50)),
        min_size=1,
        max_size=8,
    ),
    st.integers(1, 7),
    st.randoms(use_true_random=False),
)
def test_merged_shards_equal_one_pass(specs, n_shards, rnd) -> None:
    rng = np.random.default_rng(rnd.randint(0, 2**31))
    batches = [rng.normal(m, s, n).astype(np.float32) for m, s, n in specs]
    one = _one_pass(batches)
    cut = sorted(rnd.sample(range(len(batches) + 1), min(n_shards, len(batches) + 1)))
    shards, prev = [], 0
    for c in [*cut, len(batches)]:
        shards.append(_one_pass(batches[prev:c]))
        prev = c
    rnd.shuffle(shards)
    merged = TensorStats(64)
    for s in shards:
        merged = merged.merge(s)
    assert merged == one
    assert merged.counts.sum() == sum(b.size for b in batches)
    assert merged.min == min(float(b.min()) for b in batches)
    assert merged.max == max(float(b.max()) for b in batches)


def test_merge_all_by_tensor_name() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=100), rng.normal(5, 2, size=100)
    s1, s2, s3 = TensorStats(), TensorStats(), TensorStats()
    s1.update(a)
    s2.update(b)
    s3.update(a)
    s3.update(b)
    merged = merge_all([{"t": s1}, {"t": s2}])
    assert merged["t"] == s3


def test_histogram_uses_at_least_half_the_bins() -> None:
    s = TensorStats(2048)
    s.update(np.random.default_rng(0).uniform(-3, 7, 10000))
    lo = s.start * s.width
    assert lo <= s.min and (s.start + 2048) * s.width > s.max
    assert (s.max - s.min) / s.width > 1024


def test_sentinels_and_nonfinite_are_counted_not_binned() -> None:
    s = TensorStats()
    x = np.array([0.5, -1.0, np.finfo(np.float32).min, np.nan, np.inf, 2.0], np.float32)
    s.update(x)
    assert (s.min, s.max, s.count) == (-1.0, 2.0, 3)
    assert s.sentinels == 1 and s.nonfinite == 2 and s.has_sentinels
    assert SENTINEL < np.finfo(np.float32).max


def test_zero_range_tensor() -> None:
    s = TensorStats()
    s.update(np.full(100, 3.25, np.float32))
    s.update(np.full(7, 3.25, np.float32))
    assert s.min == s.max == 3.25 and s.counts.sum() == 107
    z = TensorStats()
    z.update(np.zeros(10, np.float32))
    assert z.min == z.max == 0.0


class _FakeSession:
    """Returns fresh random activations of a fixed size for every requested tensor."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)

    def run(self, names, feeds):
        return [self.rng.normal(i, 1 + i, (64, 256)).astype(np.float32) for i in range(len(names))]


def _peak(n_batches: int) -> int:
    names = [f"t{i}" for i in range(20)]
    batches = ({"x": np.zeros(1)} for _ in range(n_batches))
    tracemalloc.start()
    collect(_FakeSession(), batches, names, channel_tensors=names[:5], progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def test_calibration_memory_does_not_grow_with_batches() -> None:
    small, large = _peak(5), _peak(50)
    assert large < small * 1.2 + 256 * 1024, (small, large)
