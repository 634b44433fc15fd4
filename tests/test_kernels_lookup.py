"""The byte table lookup (kernels/lookup.py, via gather_1d and lookup_u8) equals numpy's
table[x] bit for bit, on the VBMI and the portable path, on one and two threads."""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlinear.runtime.kernels import config, lookup
from qlinear.runtime.kernels import qelementwise as qk

VBMI = pytest.mark.skipif(not config.host_has_vbmi(), reason="CPU without AVX512-VBMI")
PATHS = [pytest.param("auto", id="vbmi", marks=VBMI), pytest.param("portable", id="portable")]
V, P = lookup.VBMI_CHUNK, lookup.PORTABLE_CHUNK
#: Small sizes, the 64-byte vector and task edges, and up to ~300 000 bytes (large ones
#: run on both threads when there are two).
SIZES = st.one_of(
    st.integers(0, 300),
    st.sampled_from([1, 63, 64, 65, 127, 128, P - 1, P + 1, V - 1, V, V + 1, 3 * V + 17,
                     300_000]),
    st.integers(0, 300_000),
)
TABLE_TYPES = st.sampled_from([np.uint8, np.int8])


@contextmanager
def kernels(name: str, threads: int = 1):
    """QLINEAR_KERNELS=name and `threads` kernel threads for the duration
    (hypothesis-safe, unlike monkeypatch)."""
    old = os.environ.get("QLINEAR_KERNELS")
    before = config.num_threads()
    os.environ["QLINEAR_KERNELS"] = name
    config.set_num_threads(threads)
    try:
        yield
    finally:
        config.set_num_threads(before)
        if old is None:
            os.environ.pop("QLINEAR_KERNELS", None)
        else:
            os.environ["QLINEAR_KERNELS"] = old


def _table(rng: np.random.Generator, dtype, n: int = 256) -> np.ndarray:
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=60, deadline=None)
@given(n=SIZES, offset=st.integers(0, 63), seed=st.integers(0, 2**32 - 1),
       threads=st.sampled_from([1, 2]), chunk=st.sampled_from([None, 1, 64, 1000, 4096]))
def test_lookup_bytes_touches_exactly_its_range(path, n, offset, seed, threads,
                                                chunk) -> None:
    """Unaligned input and output, guard bytes on both sides of the output (the masked
    tail must not write past the end), tasks of any size."""
    rng = np.random.default_rng(seed)
    table = _table(rng, np.uint8)
    x = rng.integers(0, 256, n + offset, dtype=np.uint8)[offset:]
    buf = np.full(n + 128, 0xA5, np.uint8)
    out = buf[offset:offset + n]
    with kernels(path, threads):
        lookup.lookup_bytes(x, table, out, config.use_vbmi(), chunk)
    np.testing.assert_array_equal(out, table[x])
    assert (buf[:offset] == 0xA5).all() and (buf[offset + n:] == 0xA5).all()


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=60, deadline=None)
@given(n=SIZES, dtype=TABLE_TYPES, seed=st.integers(0, 2**32 - 1),
       threads=st.sampled_from([1, 2]), strided=st.booleans())
def test_gather_1d_equals_numpy(path, n, dtype, seed, threads, strided) -> None:
    rng = np.random.default_rng(seed)
    table = _table(rng, dtype)
    idx = rng.integers(0, 256, (n, 2) if strided else n, dtype=np.uint8)
    if strided:  # a non-contiguous view (every other byte)
        idx = idx[:, 1]
    with kernels(path, threads):
        got = qk.gather_1d(table, idx)
    assert got.dtype == table.dtype and got.shape == idx.shape
    np.testing.assert_array_equal(got, table[idx])


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=60, deadline=None)
@given(n=SIZES, x_type=TABLE_TYPES, dtype=TABLE_TYPES, seed=st.integers(0, 2**32 - 1),
       threads=st.sampled_from([1, 2]), transposed=st.booleans())
def test_lookup_u8_indexes_by_bit_pattern(path, n, x_type, dtype, seed, threads,
                                          transposed) -> None:
    rng = np.random.default_rng(seed)
    table = _table(rng, dtype)
    x = _table(rng, x_type, n)
    if transposed:  # a non-contiguous 2-D view
        x = x[: n - n % 3].reshape(3, -1).T
    with kernels(path, threads):
        got = qk.lookup_u8(x, table)
    assert got.dtype == table.dtype and got.shape == x.shape
    np.testing.assert_array_equal(got, table[x.view(np.uint8)])


@pytest.mark.parametrize("path", PATHS)
def test_edge_shapes_and_tables(path) -> None:
    rng = np.random.default_rng(1)
    with kernels(path):
        # scalar and empty inputs keep their shapes
        t8 = _table(rng, np.int8)
        np.testing.assert_array_equal(qk.lookup_u8(np.int8(-3), t8), t8[253])
        assert qk.gather_1d(t8, np.zeros((0, 5), np.uint8)).shape == (0, 5)
        # a longer byte table: uint8 indices only reach its first 256 entries
        long = _table(rng, np.uint8, 300)
        idx = rng.integers(0, 256, (70, 129), dtype=np.uint8)  # > SMALL_LOOKUP bytes
        np.testing.assert_array_equal(qk.gather_1d(long, idx), long[idx])
        # a strided table, a bool table, and a wide table (the plain numba loop)
        np.testing.assert_array_equal(qk.gather_1d(long[::-1], idx), long[::-1][idx])
        flags = rng.integers(0, 2, 256).astype(bool)
        np.testing.assert_array_equal(qk.gather_1d(flags, idx), flags[idx])
        wide = rng.standard_normal(256).astype(np.float32)
        np.testing.assert_array_equal(qk.gather_1d(wide, idx), wide[idx])
        np.testing.assert_array_equal(qk.lookup_u8(idx, wide), wide[idx])


@pytest.mark.parametrize(("path", "kernel"), [
    pytest.param("auto", "_lookup_vbmi", marks=VBMI),
    pytest.param("portable", "_lookup_portable"),
])
def test_the_override_selects_the_kernel(path, kernel, monkeypatch) -> None:
    ran = []
    real = lookup.run_tasks

    def spy(k, *args):
        ran.append(k.py_func.__name__)
        return real(k, *args)

    monkeypatch.setattr(lookup, "run_tasks", spy)
    table = np.arange(256, dtype=np.uint8)[::-1].copy()
    x = np.arange(qk.SMALL_LOOKUP, dtype=np.int64).astype(np.uint8)
    with kernels(path):
        np.testing.assert_array_equal(qk.gather_1d(table, x), table[x])
        np.testing.assert_array_equal(qk.lookup_u8(x.view(np.int8), table), table[x])
    assert ran == [kernel, kernel]
    ran.clear()
    with kernels(path):  # small inputs skip lookup_bytes' fixed cost
        np.testing.assert_array_equal(qk.gather_1d(table, x[:-1]), table[x[:-1]])
    assert ran == []


def test_lookup_bytes_rejects_a_short_table() -> None:
    with pytest.raises(ValueError, match="table"):
        lookup.lookup_bytes(np.zeros(8, np.uint8), np.zeros(128, np.uint8),
                            np.zeros(8, np.uint8))
