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


# --------------------------------------------------------------------------- narrow tiles
# Panels with <= 48 real columns run the narrow VNNI tiles (12x16, 6x32, 8x48 rows x
# columns), the epilogue is fused into the micro-kernel, and a block's last rows repeat
# the last real row. These aim at the boundaries of all of that.

NARROW_N = st.one_of(
    st.integers(1, 40),
    st.sampled_from([15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 79, 80, 81, 96, 112, 113,
                     127, 128, 129, 144, 160, 176]),
)
OUT_MODES = [np.int32, np.uint8, np.int8, np.float32]


def _want(acc, out_dtype, bias, mult, y_zp, fscale, fbias):
    if bias is not None:
        acc = (acc.astype(np.int64) + bias).astype(np.int32)
    if out_dtype == np.float32:
        return acc.astype(np.float32) * fscale + fbias
    if out_dtype == np.int32:
        return acc
    return naive.requantize(acc, mult, y_zp, out_dtype)


@pytest.mark.parametrize("use_vnni", PATHS)
@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 50), k=st.integers(1, 40), n=NARROW_N,
       a_dtype=st.sampled_from([np.uint8, np.int8]), b_dtype=st.sampled_from([np.int8, np.uint8]),
       out_dtype=st.sampled_from(OUT_MODES), per_column=st.booleans(),
       y_scale=st.sampled_from([1e-7, 1e-3, 0.05, 3.0, 1e5]), seed=st.integers(0, 2**32 - 1))
def test_narrow_tiles_small_k_match_naive(use_vnni, m, k, n, a_dtype, b_dtype, out_dtype,
                                          per_column, y_scale, seed):
    """Narrow N, tiny/odd K, M not a multiple of any tile height, distinct per-column
    weight zero points (row-sum path), all output modes, saturation both ways."""
    rng = np.random.default_rng(seed)
    a = _rand(rng, (m, k), a_dtype)
    b = _rand(rng, (k, n), b_dtype)
    a_zp = int(_zp(rng, a_dtype))
    b_zp = _zp(rng, b_dtype, n) if per_column else _zp(rng, b_dtype)
    bias = rng.integers(-(2**18), 2**18, n).astype(np.int32)
    mult = output_multiplier(np.float32(0.02), rng.uniform(1e-3, 1e-1, n).astype(np.float32),
                             np.float32(y_scale), n)
    fscale = rng.uniform(1e-4, 1e-2, n).astype(np.float32)
    fbias = rng.normal(size=n).astype(np.float32)
    y_zp = int(_zp(rng, out_dtype)) if out_dtype in (np.uint8, np.int8) else 0
    kwargs = {np.int32: dict(bias=bias), np.float32: dict(fscale=fscale, fbias=fbias)}.get(
        out_dtype, dict(bias=bias, mult=mult, y_zp=y_zp))
    out = gemm(a, a_zp, pack_matrix(b, b_zp), out_dtype=out_dtype, use_vnni=use_vnni, **kwargs)
    want = _want(naive.matmul_integer(a, a_zp, b, b_zp), out_dtype,
                 None if out_dtype == np.float32 else bias, mult, y_zp, fscale, fbias)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("use_vnni", PATHS)
@pytest.mark.parametrize("out_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("mult", [0.5, 0.25, 1.0 / 3.0, 1.5, 7e-3])
def test_fused_requantization_rounds_like_requantize_byte(use_vnni, out_dtype, mult):
    """Every accumulator in [-1500, 1500) through the fused epilogue: half-way cases
    (mult 0.5, 0.25, 1.5) round to even, both clamps, every lane and tile shape."""
    from qlinear.runtime.kernels.requant import requantize_array

    m, n = 30, 100  # full panel + 36-column narrow panel, 30 rows: 6x64 and 8x48 tiles
    a = (np.arange(m) + 100).astype(np.uint8)[:, None]
    b = np.ones((1, n), np.int8)
    bias = (np.arange(n) * m - 1500).astype(np.int32)  # acc = a - 100 + bias covers the range
    mults = np.full(n, mult, np.float32)
    info = np.iinfo(out_dtype)
    for y_zp in (info.min, 0, info.max // 2, info.max):
        got = gemm(a, 100, pack_matrix(b, 0), out_dtype=out_dtype, bias=bias, mult=mults,
                   y_zp=y_zp, use_vnni=use_vnni)
        acc = (np.arange(m)[:, None] + bias[None, :]).astype(np.int32)
        want = np.empty((m, n), np.int32)
        requantize_array(acc, mults, y_zp, info.min, info.max, want)
        np.testing.assert_array_equal(got, want.astype(out_dtype))
        np.testing.assert_array_equal(got, naive.requantize(acc, mults, y_zp, out_dtype))


@pytest.mark.parametrize("use_vnni", PATHS)
@pytest.mark.parametrize("n", [5, 16, 24, 40, 64, 100])
@pytest.mark.parametrize("out_dtype", [np.int32, np.uint8, np.float32])
def test_strided_output_raw_tiles(use_vnni, n, out_dtype, rng):
    """out_col_stride != 1 (column-major output): the raw int32 tile of every tile shape
    (narrow ones repeating rows) goes through the numba epilogue."""
    from qlinear.runtime.kernels.gemm import run_packed
    from qlinear.runtime.kernels.requant import OUT_FLOAT, OUT_INT32, OUT_QUANTIZED

    m, k = 29, 11
    kp = 12
    a = _rand(rng, (m, k), np.uint8)
    b = _rand(rng, (k, n), np.int8)
    b_zp = _zp(rng, np.int8, n)
    buf = np.zeros((m, kp), np.uint8)
    buf[:, :k] = a
    packed = pack_matrix(b, b_zp)
    bias = rng.integers(-1000, 1000, n).astype(np.int32)
    mult = np.full(n, 0.01, np.float32)
    fscale = rng.uniform(1e-3, 1e-1, n).astype(np.float32)
    mode = {np.int32: OUT_INT32, np.uint8: OUT_QUANTIZED, np.float32: OUT_FLOAT}[out_dtype]
    out = np.zeros(n * m, out_dtype)
    rows = np.arange(m, dtype=np.int64)
    run_packed(buf.reshape(-1), rows * kp, 0, np.zeros(1, np.int64), 9, packed, mode=mode,
               out=out.view(np.int32) if out_dtype == np.int32 else out,
               out_row_off=rows, out_col_stride=m, bias=bias, mult=mult, y_zp=3,
               fscale=fscale, use_vnni=use_vnni)
    acc = naive.matmul_integer(a, 9, b, b_zp)
    want = _want(acc, out_dtype, bias, mult, 3, fscale, np.zeros(n, np.float32))
    np.testing.assert_array_equal(out.reshape(n, m).T, want)


@pytest.mark.parametrize("kernels", ["auto", "portable"])
@pytest.mark.parametrize("x_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("c_in,c_out,stride", [(32, 16, 1), (16, 24, 1), (3, 40, 2), (24, 96, 1),
                                               (20, 8, 2), (8, 113, 1)])
def test_conv_nhwc_1x1_narrow_outputs(kernels, x_dtype, c_in, c_out, stride, rng, monkeypatch):
    """Pointwise NHWC convolutions (MobileNet shapes, scaled down): narrow C_out, small
    C_in, distinct per-channel weight zero points, output pixels not a tile multiple."""
    from qlinear.runtime.kernels.conv import pack_conv_weights
    from qlinear.runtime.kernels.nhwc import conv_nhwc

    monkeypatch.setenv("QLINEAR_KERNELS", kernels)
    w = _rand(rng, (c_out, c_in, 1, 1), np.int8)
    w_zp = rng.integers(-20, 21, c_out)
    packed = pack_conv_weights(w, w_zp, 1)
    info = np.iinfo(x_dtype)
    x_zp = int(rng.integers(info.min, info.max + 1))
    bias = rng.integers(-5000, 5000, c_out).astype(np.int32)
    mult = rng.uniform(1e-4, 1e-2, c_out).astype(np.float32)
    x = _rand(rng, (1, c_in, 13, 11), x_dtype)
    xt = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    st2 = (stride, stride)
    geometry = dict(strides=st2, begin=(0, 0), end=(0, 0))
    acc = naive.conv_integer(x, x_zp, w, w_zp, **geometry)
    got = conv_nhwc(xt, x_zp, packed, st2, (1, 1), (0, 0), (0, 0), out_dtype=np.int32)
    np.testing.assert_array_equal(got, acc.transpose(0, 2, 3, 1))
    acc_b = (acc.astype(np.int64) + bias.reshape(1, -1, 1, 1)).astype(np.int32)
    want = naive.requantize(np.moveaxis(acc_b, 1, -1), mult, -3 if x_dtype == np.int8 else 9,
                            x_dtype)
    got = conv_nhwc(xt, x_zp, packed, st2, (1, 1), (0, 0), (0, 0), out_dtype=x_dtype,
                    bias=bias, mult=mult, y_zp=-3 if x_dtype == np.int8 else 9)
    np.testing.assert_array_equal(got, want)


def test_generic_fallback_without_vnni_is_exact(monkeypatch, rng):
    """Without AVX512-VNNI, asking LLVM for vpdpbusd aborts the process, so the kernels
    then emit a generic widening multiply-add. Built here as if the host lacked VNNI
    (that IR runs on any CPU): no vpdpbusd in it, and bit-exact results."""
    from numba import njit

    from qlinear.runtime.kernels import vnni
    from qlinear.runtime.kernels.gemm import pack_weights

    monkeypatch.setattr(vnni, "host_has_vnni", lambda: False)
    kernel = vnni._make_tile_kernel(vnni.NARROW_ROWS[1], 1)

    @njit
    def run(a, row_off, taps, c4, b, col, mult, qf, out_off, m, ncols, out_q):
        e_i = np.empty(0, np.int32)
        e_f = np.empty(0, np.float32)
        tile = np.empty(vnni.TILE_ROWS * 64, np.int32)
        kernel(a, row_off, 0, m, 0, taps, c4, 4, b, 0, tile, 1, ncols, col, e_i, 0, e_i, 0,
               False, out_off, 0, e_i, out_q, e_f, mult, e_f, e_f, qf)

    m, k, n = 29, 20, 13  # two full 12-row tiles and one repeating its last row
    a = _rand(rng, (m, k), np.uint8)
    b = _rand(rng, (k, n), np.int8)
    packed = pack_weights(b[None, None], 0)
    mult = np.zeros(64, np.float32)
    mult[:n] = rng.uniform(1e-3, 1e-2, n)
    out = np.zeros((m, n), np.uint8)
    run(a.reshape(-1), np.arange(m, dtype=np.int64) * k, np.zeros(1, np.int64), k // 4,
        packed.data, np.zeros(64, np.int32), mult, np.array([5, -5, 250], np.float32),
        np.arange(m, dtype=np.int64) * n, m, n, out.reshape(-1))
    assert "llvm.x86.avx512.vpdpbusd" not in "".join(run.inspect_llvm().values())
    want = naive.requantize(naive.matmul_integer(a, 0, b, 0), mult[:n], 5, np.uint8)
    np.testing.assert_array_equal(out, want)


# --------------------------------------------------------------------------- column add
# The 8-bit GEMM output followed by a QLinearAdd of a constant per-column vector, done
# in the epilogue (requant.ColumnAdd): the same bits as the separate QLinearAdd kernel.


def _qlinear_add(a, sa, za, b, sb, zb, sc, zc):
    """The runtime's QLinearAdd op (the reference the fused epilogue must equal)."""
    from onnx import helper

    from qlinear.runtime.registry import MS_DOMAIN, NodeSpec, lookup

    node = helper.make_node("QLinearAdd", list("abcdefgh"), ["y"], domain=MS_DOMAIN)
    kernel = lookup(MS_DOMAIN, "QLinearAdd", 1)(NodeSpec(proto=node, opset=1))
    f32 = np.float32
    return kernel(a, f32(sa), za, b, f32(sb), zb, f32(sc), zc)


def _column_add(sa, za, b, sb, zb, sc, zc, const_first, n):
    """The ColumnAdd of QLinearAdd(q, b) (or (b, q)) as the step fusion builds it."""
    from qlinear.runtime.kernels.requant import column_add
    from qlinear.runtime.ops.contrib_qlinear import _add_params

    f32 = np.float32
    if const_first:
        params = _add_params(f32(sb), zb, f32(sa), za, f32(sc), zc)
    else:
        params = _add_params(f32(sa), za, f32(sb), zb, f32(sc), zc)
    return column_add(*params, b, const_first, n, zc.dtype)


#: (q scale, bias scale, output scale) of the add: typical, ties (r = 0.5), the bias
#: alone saturating, q alone saturating, everything collapsing onto the zero point.
ADD_SCALES = [(0.05, 0.01, 0.06), (0.5, 0.5, 1.0), (0.05, 0.5, 0.01), (1.0, 0.01, 0.01),
              (1e-3, 1e-3, 1.0)]


@pytest.mark.parametrize("use_vnni", PATHS)
@pytest.mark.parametrize("a_dtype,q_dtype", DTYPES)
@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 150), n=NARROW_N,
       out_dtype=st.sampled_from([np.uint8, np.int8]), scales=st.sampled_from(ADD_SCALES),
       const_first=st.booleans(), extremes=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_gemm_then_column_add_equals_qlinear_add(use_vnni, a_dtype, q_dtype, m, k, n,
                                                 out_dtype, scales, const_first, extremes,
                                                 seed):
    """gemm(..., add=ColumnAdd) == QLinearAdd(gemm(...), bias) bit for bit: any shape
    (1, odd, narrow and multi-panel N), both 8-bit types at each stage, per-column
    weight zero points, biases at the type's ends, second stages that saturate."""
    rng = np.random.default_rng(seed)
    a = _rand(rng, (m, k), a_dtype)
    b = _rand(rng, (k, n), np.int8)
    a_zp, b_zp = int(_zp(rng, a_dtype)), _zp(rng, np.int8, n)
    mult = output_multiplier(np.float32(0.02), rng.uniform(1e-3, 1e-1, n).astype(np.float32),
                             np.float32(rng.choice([0.05, 3.0])), n)
    y_zp = int(_zp(rng, q_dtype))
    info = np.iinfo(q_dtype)
    bias = _rand(rng, n, q_dtype)
    if extremes:
        bias[::2] = info.min
        bias[1::2] = info.max
    sa, sb, sc = scales
    za, zb = np.array(y_zp, q_dtype), np.array(_zp(rng, q_dtype), q_dtype)
    zc = np.array(_zp(rng, out_dtype), out_dtype)
    packed = pack_matrix(b, b_zp)
    q = gemm(a, a_zp, packed, out_dtype=q_dtype, mult=mult, y_zp=y_zp, use_vnni=use_vnni)
    args = (bias, sb, zb, q, sa, za) if const_first else (q, sa, za, bias, sb, zb)
    want = _qlinear_add(*args, sc, zc)
    add = _column_add(sa, za, bias, sb, zb, sc, zc, const_first, n)
    got = gemm(a, a_zp, packed, out_dtype=q_dtype, mult=mult, y_zp=y_zp, use_vnni=use_vnni,
               add=add)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("use_vnni", PATHS)
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("scales", ADD_SCALES)
@pytest.mark.parametrize("const_first", [False, True])
def test_column_add_every_value_pair(use_vnni, dtype, scales, const_first):
    """Every (q, bias) pair of the type: q = the 256 rows (K = 1, multiplier 1), the
    bias the 256 columns (four panels), through the fused epilogue and the op."""
    info = np.iinfo(dtype)
    a = np.arange(256, dtype=np.uint8)[:, None]
    a_zp = 128 if dtype == np.int8 else 0  # q = a - a_zp: every value of the type
    packed = pack_matrix(np.ones((1, 256), np.int8), 0)
    mult = np.ones(256, np.float32)
    bias = np.arange(info.min, info.max + 1).astype(dtype)
    sa, sb, sc = scales
    za, zb, zc = (np.array(v, dtype) for v in (info.min + 3, info.max - 60, info.min + 77))
    q = gemm(a, a_zp, packed, out_dtype=dtype, mult=mult, y_zp=0, use_vnni=use_vnni)
    np.testing.assert_array_equal(q[:, 0], np.arange(info.min, info.max + 1))
    args = (bias, sb, zb, q, sa, za) if const_first else (q, sa, za, bias, sb, zb)
    want = _qlinear_add(*args, sc, zc)
    add = _column_add(sa, za, bias, sb, zb, sc, zc, const_first, 256)
    got = gemm(a, a_zp, packed, out_dtype=dtype, mult=mult, y_zp=0, use_vnni=use_vnni, add=add)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("use_vnni", PATHS)
def test_column_add_strided_output(use_vnni, rng):
    """Column-major output (the numba epilogue's strided branch) in the add mode."""
    from qlinear.runtime.kernels.gemm import run_packed
    from qlinear.runtime.kernels.requant import OUT_QUANTIZED_ADD

    m, k, n, kp = 29, 11, 100, 12
    a = _rand(rng, (m, k), np.uint8)
    b = _rand(rng, (k, n), np.int8)
    b_zp = _zp(rng, np.int8, n)
    buf = np.zeros((m, kp), np.uint8)
    buf[:, :k] = a
    mult = np.full(n, 0.01, np.float32)
    bias = _rand(rng, n, np.uint8)
    zb, zc, za = np.uint8(100), np.uint8(128), np.uint8(3)
    add = _column_add(0.05, za, bias, 0.02, zb, 0.04, zc, False, n)
    out = np.zeros(n * m, np.uint8)
    rows = np.arange(m, dtype=np.int64)
    run_packed(buf.reshape(-1), rows * kp, 0, np.zeros(1, np.int64), 9, pack_matrix(b, b_zp),
               mode=OUT_QUANTIZED_ADD, out=out, out_row_off=rows, out_col_stride=m, mult=mult,
               y_zp=3, add=add, use_vnni=use_vnni)
    q = naive.requantize(naive.matmul_integer(a, 9, b, b_zp), mult, 3, np.uint8)
    want = _qlinear_add(q, 0.05, za, bias, 0.02, zb, 0.04, zc)
    np.testing.assert_array_equal(out.reshape(n, m).T, want)
