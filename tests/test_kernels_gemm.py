"""Micro-kernel/driver tests for the int8 GEMM against tests/naive.py (atol=0)."""

from __future__ import annotations

import naive
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlinear.runtime.kernels import config
from qlinear.runtime.kernels.gemm import gemm, pack_matrix
from qlinear.runtime.kernels.requant import output_multiplier

PATHS = [
    pytest.param(True, id="vnni", marks=pytest.mark.skipif(
        not config.host_has_vnni(), reason="CPU has no AVX512-VNNI")),
    pytest.param(False, id="portable"),
]
DTYPES = [(np.uint8, np.int8), (np.int8, np.int8), (np.uint8, np.uint8), (np.int8, np.uint8)]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _rand(rng, shape, dtype):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape).astype(dtype)


def _zp(rng, dtype, n=None):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, n).astype(np.int64)


@pytest.mark.parametrize("use_vnni", PATHS)
@pytest.mark.parametrize("a_dtype,b_dtype", DTYPES)
@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 150), n=st.integers(1, 150),
       seed=st.integers(0, 2**32 - 1), per_column=st.booleans())
def test_gemm_int32_matches_naive(use_vnni, a_dtype, b_dtype, m, k, n, seed, per_column):
    rng = np.random.default_rng(seed)
    a = _rand(rng, (m, k), a_dtype)
    b = _rand(rng, (k, n), b_dtype)
    a_zp = int(_zp(rng, a_dtype))
    b_zp = _zp(rng, b_dtype, n) if per_column else _zp(rng, b_dtype)
    out = gemm(a, a_zp, pack_matrix(b, b_zp), use_vnni=use_vnni)
    np.testing.assert_array_equal(out, naive.matmul_integer(a, a_zp, b, b_zp))


@pytest.mark.parametrize("use_vnni", PATHS)
@pytest.mark.parametrize("out_dtype", [np.uint8, np.int8])
@settings(max_examples=10, deadline=None)
@given(m=st.integers(1, 30), k=st.integers(1, 100), n=st.integers(1, 100),
       seed=st.integers(0, 2**32 - 1), y_scale=st.sampled_from([1e-4, 0.05, 3.0, 1e4]))
def test_gemm_requantized_matches_naive(use_vnni, out_dtype, m, k, n, seed, y_scale):
    rng = np.random.default_rng(seed)
    a = _rand(rng, (m, k), np.uint8)
    b = _rand(rng, (k, n), np.int8)
    a_zp, b_zp = int(_zp(rng, np.uint8)), _zp(rng, np.int8, n)
    bias = rng.integers(-(2**20), 2**20, n).astype(np.int32)
    w_scale = rng.uniform(1e-3, 1e-1, n).astype(np.float32)
    y_zp = int(_zp(rng, out_dtype))
    mult = output_multiplier(np.float32(0.02), w_scale, np.float32(y_scale), n)
    out = gemm(a, a_zp, pack_matrix(b, b_zp), out_dtype=out_dtype, bias=bias, mult=mult,
               y_zp=y_zp, use_vnni=use_vnni)
    acc = naive.matmul_integer(a, a_zp, b, b_zp).astype(np.int64) + bias
    want = naive.requantize(acc.astype(np.int32), naive.multiplier(0.02, w_scale, y_scale),
                            y_zp, out_dtype)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("use_vnni", PATHS)
def test_gemm_float_epilogue(use_vnni, rng):
    a = _rand(rng, (17, 45), np.int8)
    b = _rand(rng, (45, 70), np.int8)
    b_zp = _zp(rng, np.int8, 70)
    scale = rng.uniform(1e-4, 1e-2, 70).astype(np.float32)
    bias = rng.normal(size=70).astype(np.float32)
    out = gemm(a, -3, pack_matrix(b, b_zp), out_dtype=np.float32, fscale=scale, fbias=bias,
               use_vnni=use_vnni)
    acc = naive.matmul_integer(a, -3, b, b_zp)
    np.testing.assert_array_equal(out, acc.astype(np.float32) * scale + bias)


@pytest.mark.parametrize("use_vnni", PATHS)
@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 63, 255, 257])
def test_cross_term_uses_real_k_not_unrolled_k(use_vnni, k, rng):
    """K not a multiple of the 4-byte step: K*a_zp*b_zp must use K, not the padded K."""
    a = _rand(rng, (9, k), np.uint8)
    b = _rand(rng, (k, 67), np.int8)
    b_zp = np.arange(67) % 50 - 25  # distinct per column, nonzero
    out = gemm(a, 200, pack_matrix(b, b_zp), use_vnni=use_vnni)
    np.testing.assert_array_equal(out, naive.matmul_integer(a, 200, b, b_zp))


@pytest.mark.parametrize("use_vnni", PATHS)
def test_int32_accumulator_not_truncated_before_float_multiply(use_vnni):
    """Large K with extreme values: |acc| >> 2^24 and near 2^31 survives into the epilogue."""
    k = 4608
    a = np.full((3, k), 255, np.uint8)
    a[1] = 0
    b = np.full((k, 5), -128, np.int8)
    b[:, 1] = 127
    packed = pack_matrix(b, 0)
    acc = gemm(a, 0, packed, use_vnni=use_vnni)
    np.testing.assert_array_equal(acc, naive.matmul_integer(a, 0, b, 0))
    assert acc[0, 0] == -255 * 128 * k
    f = gemm(a, 0, packed, out_dtype=np.float32, fscale=np.full(5, 1e-6, np.float32),
             use_vnni=use_vnni)
    np.testing.assert_array_equal(f, acc.astype(np.float32) * np.float32(1e-6))
    mult = np.full(5, 1e-7, np.float32)
    q = gemm(a, 0, packed, out_dtype=np.int8, mult=mult, y_zp=0, use_vnni=use_vnni)
    np.testing.assert_array_equal(q, naive.requantize(acc, mult, 0, np.int8))


@pytest.mark.parametrize("use_vnni", PATHS)
@settings(max_examples=4, deadline=None)
@given(m=st.integers(1, 13), k=st.integers(1000, 4608), n=st.integers(1, 130),
       seed=st.integers(0, 2**32 - 1))
def test_gemm_large_k(use_vnni, m, k, n, seed):
    rng = np.random.default_rng(seed)
    a = _rand(rng, (m, k), np.int8)
    b = _rand(rng, (k, n), np.uint8)
    b_zp = _zp(rng, np.uint8, n)
    out = gemm(a, 17, pack_matrix(b, b_zp), use_vnni=use_vnni)
    np.testing.assert_array_equal(out, naive.matmul_integer(a, 17, b, b_zp))


def test_kernel_choice_env(monkeypatch):
    monkeypatch.setenv("QLINEAR_KERNELS", "portable")
    assert config.use_vnni() is False
    monkeypatch.setenv("QLINEAR_KERNELS", "bogus")
    with pytest.raises(ValueError):
        config.use_vnni()
    monkeypatch.setenv("QLINEAR_KERNELS", "auto")
    assert config.use_vnni() == config.host_has_vnni()


def test_int8_activation_shift_folds_into_zero_point(rng):
    """int8 A equals its uint8 (+128) image with a_zp + 128, bit for bit."""
    a = _rand(rng, (8, 33), np.int8)
    b = _rand(rng, (33, 20), np.int8)
    packed = pack_matrix(b, _zp(rng, np.int8, 20))
    au = (a.astype(np.int16) + 128).astype(np.uint8)
    np.testing.assert_array_equal(gemm(a, -5, packed), gemm(au, 123, packed))


# --------------------------------------------------------------------------- batched


@pytest.mark.parametrize("use_vnni", PATHS)
@pytest.mark.parametrize("a_dtype,b_dtype", DTYPES)
@pytest.mark.parametrize("g,m,k,n", [(12, 13, 64, 70), (3, 1, 13, 5), (2, 9, 67, 130)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_gemm_batched_activations(use_vnni, a_dtype, b_dtype, g, m, k, n, layout, rng):
    """Attention-style A[G] x B[G] (B packed per call, all entries in one driver call):
    word-copy packing (K % 4 == 0, B^T contiguous or not) and byte packing, requantized."""
    from qlinear.runtime.kernels.gemm import gemm_batched

    a = _rand(rng, (g, m, k), a_dtype)
    b = _rand(rng, (g, k, n), b_dtype)
    if layout == "transposed":  # K^T as a view of K, as attention's Transpose leaves it
        b = np.ascontiguousarray(np.swapaxes(b, 1, 2)).swapaxes(1, 2)
    a_zp, b_zp = int(_zp(rng, a_dtype)), int(_zp(rng, b_dtype))
    mult = output_multiplier(np.float32(0.02), np.float32(0.03), np.float32(0.5), n)
    for _ in range(2):  # the second call reuses the memoized launch
        got = gemm_batched(a, a_zp, b, b_zp, out_dtype=np.int8, mult=mult, y_zp=-3,
                           use_vnni=use_vnni)
        want = naive.requantize(naive.matmul_integer(a, a_zp, b, b_zp), mult, -3, np.int8)
        np.testing.assert_array_equal(got, want)
    acc = gemm_batched(a, a_zp, b, b_zp, out_dtype=np.int32, use_vnni=use_vnni)
    np.testing.assert_array_equal(acc, naive.matmul_integer(a, a_zp, b, b_zp))


@pytest.mark.parametrize("use_vnni", PATHS)
def test_gemm_constant_batched_weights(use_vnni, rng):
    """Constant B with batch dims packed once as groups: one call, output [G, M, N]."""
    from qlinear.runtime.kernels.gemm import pack_weights

    a = _rand(rng, (4, 7, 30), np.uint8)
    b = _rand(rng, (4, 30, 65), np.int8)
    packed = pack_weights(b[:, None], 3)
    fscale = np.linspace(0.5, 2, 65).astype(np.float32)
    got = gemm(a, 11, packed, out_dtype=np.float32, fscale=fscale, use_vnni=use_vnni)
    want = naive.matmul_integer(a, 11, b, 3).astype(np.float32) * fscale
    np.testing.assert_array_equal(got, want)
