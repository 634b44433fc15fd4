"""The register-blocked depthwise kernel (qlinear/runtime/kernels/depthwise.py) against
tests/naive.py, through both entry points (NHWC `conv_nhwc`, NCHW `conv`).

Aimed at the kernel's edges: channel counts that leave a partial 16/32-channel block,
rows that are not a multiple of the pixel block, border pixels (checked blocks), rows
outside the image, strides, dilations, asymmetric pads, any kernel shape, channel
multiplier 2, int8 activations (sign-extended in place), distinct per-channel weight
zero points, saturation at both ends, int32 / 8-bit / float32 outputs.
"""

from __future__ import annotations

import naive
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from qlinear.runtime.kernels import config, depthwise
from qlinear.runtime.kernels.conv import conv, pack_conv_weights
from qlinear.runtime.kernels.nhwc import conv_nhwc
from qlinear.runtime.kernels.requant import OUT_QUANTIZED


def _rand(rng, shape, dtype, lo=None, hi=None):
    info = np.iinfo(dtype)
    lo = info.min if lo is None else lo
    hi = info.max if hi is None else hi
    return rng.integers(lo, hi + 1, shape).astype(dtype)


@st.composite
def dw_cases(draw):
    k = draw(st.sampled_from([(1, 1), (3, 3), (3, 3), (5, 5), (7, 7), (3, 5), (2, 1)]))
    strides = (draw(st.integers(1, 2)), draw(st.integers(1, 3)))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    begin = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    end = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    hw = tuple(max(draw(st.integers(1, 15)), dil[i] * (k[i] - 1) + 1 - begin[i] - end[i])
               for i in range(2))
    return dict(
        batch=draw(st.integers(1, 2)),
        c_in=draw(st.sampled_from([2, 3, 16, 17, 31, 32, 33, 48, 64, 65])),
        mult=draw(st.sampled_from([1, 1, 2])),
        k=k, strides=strides, dil=dil, begin=begin, end=end, hw=hw,
        x_dtype=draw(st.sampled_from([np.uint8, np.int8])),
        w_dtype=draw(st.sampled_from([np.int8, np.uint8])),
        y_dtype=draw(st.sampled_from([np.uint8, np.int8])),
        scale=draw(st.sampled_from([1e-4, 3e-3, 0.05, 10.0])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _case_arrays(c):
    rng = np.random.default_rng(c["seed"])
    c_out = c["c_in"] * c["mult"]
    x = _rand(rng, (c["batch"], c["c_in"], *c["hw"]), c["x_dtype"])
    w = _rand(rng, (c_out, 1, *c["k"]), c["w_dtype"])
    x_zp = int(_rand(rng, (), c["x_dtype"]))
    w_zp = _rand(rng, (c_out,), c["w_dtype"]).astype(np.int64)  # distinct per channel
    bias = rng.integers(-30000, 30000, c_out).astype(np.int32)
    mult = (c["scale"] * rng.uniform(0.5, 2.0, c_out)).astype(np.float32)
    y_zp = int(_rand(rng, (), c["y_dtype"]))
    return x, w, x_zp, w_zp, bias, mult, y_zp


def _expected(c, x, w, x_zp, w_zp, bias, mult, y_zp):
    geometry = dict(group=c["c_in"], strides=c["strides"], dilations=c["dil"], begin=c["begin"],
                    end=c["end"])
    acc = naive.conv_integer(x, x_zp, w, w_zp, **geometry)
    acc_b = (acc.astype(np.int64) + bias.reshape(1, -1, 1, 1)).astype(np.int32)
    q = np.moveaxis(naive.requantize(np.moveaxis(acc_b, 1, -1), mult, y_zp, c["y_dtype"]), -1, 1)
    return acc, q


@settings(max_examples=150, deadline=None)
@given(case=dw_cases())
def test_depthwise_nhwc_and_nchw_match_naive(case):
    x, w, x_zp, w_zp, bias, mult, y_zp = _case_arrays(case)
    acc, q = _expected(case, x, w, x_zp, w_zp, bias, mult, y_zp)
    packed = pack_conv_weights(w, w_zp, case["c_in"])
    assert packed.depthwise
    geo = (case["strides"], case["dil"], case["begin"], case["end"])
    xt = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    got = conv_nhwc(xt, x_zp, packed, *geo, out_dtype=np.int32)
    np.testing.assert_array_equal(got, acc.transpose(0, 2, 3, 1))
    got = conv_nhwc(xt, x_zp, packed, *geo, out_dtype=case["y_dtype"], bias=bias, mult=mult,
                    y_zp=y_zp)
    np.testing.assert_array_equal(got, q.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(conv(x, x_zp, packed, *geo), acc)
    got = conv(x, x_zp, packed, *geo, out_dtype=case["y_dtype"], bias=bias, mult=mult, y_zp=y_zp)
    np.testing.assert_array_equal(got, q)


@pytest.mark.parametrize("y_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("c", [16, 40])
def test_requantization_saturates_both_ways(y_dtype, c):
    """Large multipliers and extreme zero points push outputs past both ends of the range:
    the clamp (in float, before rounding) must give exactly the reference's bytes, and
    both ends must actually be hit (else this test could not fail on the clamp)."""
    rng = np.random.default_rng(5)
    info = np.iinfo(y_dtype)
    x = _rand(rng, (1, 9, 13, c), np.uint8)
    w = _rand(rng, (c, 1, 3, 3), np.int8)
    w_zp = _rand(rng, (c,), np.int8).astype(np.int64)
    packed = pack_conv_weights(w, w_zp, c)
    bias = rng.integers(-(2**20), 2**20, c).astype(np.int32)
    x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    acc = naive.conv_integer(x_nchw, 200, w, w_zp, c, begin=(1, 1), end=(1, 1))
    acc_b = np.moveaxis((acc.astype(np.int64) + bias.reshape(1, -1, 1, 1)).astype(np.int32), 1, -1)
    for mult_v, y_zp in [(0.5, int(info.max)), (0.5, int(info.min)), (3e-4, int(info.min) + 3),
                         (7.0, 0)]:
        mult = np.full(c, mult_v, np.float32)
        got = conv_nhwc(x, 200, packed, (1, 1), (1, 1), (1, 1), (1, 1), out_dtype=y_dtype,
                        bias=bias, mult=mult, y_zp=y_zp)
        want = naive.requantize(acc_b, mult, y_zp, y_dtype)
        np.testing.assert_array_equal(got, want)
        if mult_v > 1:
            assert (got == info.min).any() and (got == info.max).any()


def test_float_output_nchw():
    """acc * fscale[c] + fbias[c] in float32 (no fused multiply-add), bias in the acc."""
    rng = np.random.default_rng(3)
    c = 35
    x = _rand(rng, (2, c, 10, 11), np.int8)
    w = _rand(rng, (c, 1, 3, 3), np.int8)
    w_zp = _rand(rng, (c,), np.int8).astype(np.int64)
    bias = rng.integers(-1000, 1000, c).astype(np.int32)
    fscale = rng.uniform(1e-4, 1e-2, c).astype(np.float32)
    fbias = rng.uniform(-3, 3, c).astype(np.float32)
    packed = pack_conv_weights(w, w_zp, c)
    got = conv(x, -7, packed, (2, 1), (1, 1), (1, 0), (0, 1), out_dtype=np.float32, bias=bias,
               fscale=fscale, fbias=fbias)
    acc = naive.conv_integer(x, -7, w, w_zp, c, (2, 1), (1, 1), (1, 0), (0, 1))
    acc = (acc.astype(np.int64) + bias.reshape(1, -1, 1, 1)).astype(np.int32)
    want = acc.astype(np.float32) * fscale.reshape(1, -1, 1, 1) + fbias.reshape(1, -1, 1, 1)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("c", [5, 16, 24, 48])
@pytest.mark.parametrize("mode", ["int32", "uint8"])
def test_writes_only_real_channels(c, mode):
    """A last block past the real channel count (c % 32 != 0) must not write beyond the
    output: the output is a view into a larger buffer whose guard bytes must survive."""
    rng = np.random.default_rng(c)
    x = _rand(rng, (1, 5, 7, c), np.uint8)
    centered = rng.integers(-255, 256, (9, c)).astype(np.int16)
    cs = depthwise.channel_stride(c)
    xin = np.zeros((1, 5, 7, cs), np.uint8)
    xin[..., :c] = x
    dtype = np.int32 if mode == "int32" else np.uint8
    mode_id = 0 if mode == "int32" else OUT_QUANTIZED
    launch = depthwise.DepthwiseLaunch(
        centered, (3, 3), (1, 1), (1, 1), (1, 1), xin.shape, (5, 7), x_zp=9, signed=False,
        mode=mode_id, mult=np.full(c, 0.01, np.float32), y_zp=3)
    n = 5 * 7 * c
    backing = np.full(n + 64, 0x5A, dtype)
    launch.run(xin, backing[:n].reshape(1, 5, 7, c))
    assert (backing[n:] == 0x5A).all()
    wt = centered.T.reshape(c, 1, 3, 3).astype(np.int64)
    acc = naive.conv_integer(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), 9, wt, 0, c,
                             begin=(1, 1), end=(1, 1)).transpose(0, 2, 3, 1)
    want = acc if mode == "int32" else naive.requantize(acc, np.full(c, 0.01, np.float32), 3,
                                                        np.uint8)
    np.testing.assert_array_equal(backing[:n].reshape(1, 5, 7, c), want)


def test_nhwc_reads_input_in_place_when_channels_allow():
    """uint8/int8 NHWC input with C % 16 == 0 and one channel per group: no copy at all."""
    from qlinear.runtime.kernels.nhwc import _plan

    rng = np.random.default_rng(1)
    for c, mult, copies in [(32, 1, False), (48, 1, False), (24, 1, True), (16, 2, True)]:
        w = _rand(rng, (c * mult, 1, 3, 3), np.int8)
        packed = pack_conv_weights(w, 0, c)
        for dtype in (np.uint8, np.int8):
            x = _rand(rng, (1, 6, 6, c), dtype)
            plan = _plan(x, 0, packed, (1, 1), (1, 1), (1, 1), (1, 1), np.dtype(np.int32), None,
                         None, 0)
            assert plan.kind == "dw" and bool(plan.dw_multiplier) == copies


@settings(max_examples=200, deadline=None)
@given(ow_n=st.integers(1, 70), data=st.data())
def test_row_blocks_cover_the_row(ow_n, data):
    """Every output pixel is covered; unchecked blocks stay inside [left, right)."""
    left = data.draw(st.integers(0, ow_n))
    right = data.draw(st.integers(left, ow_n))
    blocks = depthwise._row_blocks(ow_n, left, right)
    covered = set()
    for ow0, n, checked in blocks:
        assert n in (1, 3, depthwise.P_MAX) and 0 <= ow0 and ow0 + n <= ow_n
        assert checked or (left <= ow0 and ow0 + n <= right)
        covered.update(range(ow0, ow0 + n))
    assert covered == set(range(ow_n))
    assert sum(n for _, n, _ in blocks) == ow_n  # no pixel computed twice


_V = ir.VectorType


def _madd_test_intrinsic(madd, n):
    @intrinsic
    def apply(typingctx, acc, x, w, out):
        def codegen(context, builder, signature, args):
            ptrs = [context.make_array(t)(context, builder, a).data
                    for t, a in zip(signature.args, args, strict=True)]
            vi32, vi16 = _V(ir.IntType(32), n), _V(ir.IntType(16), 2 * n)
            acc_v = builder.load(builder.bitcast(ptrs[0], vi32.as_pointer()), align=4)
            x_v = builder.load(builder.bitcast(ptrs[1], vi16.as_pointer()), align=2)
            w_v = builder.load(builder.bitcast(ptrs[2], vi16.as_pointer()), align=2)
            builder.store(madd(builder, acc_v, x_v, w_v),
                          builder.bitcast(ptrs[3], vi32.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.void(acc, x, w, out), codegen

    @njit(cache=False)
    def run(acc, x, w, out):
        apply(acc, x, w, out)

    return run


@pytest.mark.parametrize("n", [8, 16])
def test_portable_multiply_add_matches_pmaddwd(n):
    """The plain-IR multiply-add (hosts without AVX512BW) against the pmaddwd one the
    kernel uses here, and both against numpy, on extreme and random words."""
    rng = np.random.default_rng(n)
    x = rng.integers(-(2**15), 2**15, 2 * n).astype(np.int16)
    x[:4] = [-(2**15), -(2**15), 2**15 - 1, 255]
    w = rng.integers(-(2**15), 2**15, 2 * n).astype(np.int16)
    w[:4] = [-(2**15), 2**15 - 1, -(2**15), -255]
    acc = rng.integers(-(2**31), 2**31, n).astype(np.int32)
    want = (acc.astype(np.int64) + x[0::2].astype(np.int64) * w[0::2]
            + x[1::2].astype(np.int64) * w[1::2])
    want = ((want + 2**31) % 2**32 - 2**31).astype(np.int32)
    kinds = [depthwise._pmaddwd_generic]
    if "avx512bw" in config.host_cpu_features():
        kinds.append(depthwise._pmaddwd_native)
    for madd in kinds:
        out = np.zeros(n, np.int32)
        _madd_test_intrinsic(madd, n)(acc, x, w, out)
        np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("b,c,h,w", [(1, 144, 56, 56), (2, 17, 3, 5), (1, 960, 7, 7),
                                     (1, 70, 9, 11), (1, 5, 4, 4), (2, 64, 1, 130)])
def test_byte_transposes(b, c, h, w):
    """NCHW planes <-> channels-last pixels (register tiles, overlapping edge tiles)."""
    rng = np.random.default_rng(c)
    x = _rand(rng, (b, c, h, w), np.uint8)
    cs = depthwise.channel_stride(c)
    pix = depthwise.planes_to_pixels(x, cs)
    np.testing.assert_array_equal(pix[..., :c], x.transpose(0, 2, 3, 1))
    rows = _rand(rng, (b, h * w, c), np.int8)
    out = np.empty((b, c, h, w), np.int8)
    depthwise.pixels_to_planes(rows, out)
    np.testing.assert_array_equal(out.reshape(b, c, -1), rows.transpose(0, 2, 1))
