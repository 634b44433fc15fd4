"""Convolution kernel tests (implicit GEMM, grouped, depthwise) against tests/naive.py."""

from __future__ import annotations

import naive
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlinear.runtime.kernels import config
from qlinear.runtime.kernels.conv import conv, pack_conv_weights, resolve_pads

PATHS = [
    pytest.param(True, id="vnni", marks=pytest.mark.skipif(
        not config.host_has_vnni(), reason="CPU has no AVX512-VNNI")),
    pytest.param(False, id="portable"),
]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _rand(rng, shape, dtype):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape).astype(dtype)


@st.composite
def conv_cases(draw, max_spatial=2):
    nd = draw(st.integers(1, max_spatial))
    k = tuple(draw(st.sampled_from([1, 3, 5, 7])) for _ in range(nd))
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if kind == "dense":
        groups, cg, cog = 1, draw(st.integers(1, 20)), draw(st.integers(1, 70))
    elif kind == "grouped":
        groups, cg, cog = draw(st.integers(2, 4)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    else:
        groups, cg, cog = draw(st.integers(2, 24)), 1, draw(st.sampled_from([1, 1, 2]))
    strides = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    begin = tuple(draw(st.integers(0, 3)) for _ in range(nd))
    end = tuple(draw(st.integers(0, 3)) for _ in range(nd))
    sp = tuple(max(draw(st.integers(1, 12)), dil[i] * (k[i] - 1) + 1 - begin[i] - end[i])
               for i in range(nd))
    return dict(batch=draw(st.integers(1, 2)), groups=groups, cg=cg, cog=cog, k=k, sp=sp,
                strides=strides, dil=dil, begin=begin, end=end,
                x_dtype=draw(st.sampled_from([np.uint8, np.int8])),
                w_dtype=draw(st.sampled_from([np.int8, np.uint8])),
                per_channel=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


def _run_case(c, use_vnni):
    rng = np.random.default_rng(c["seed"])
    c_in, c_out = c["groups"] * c["cg"], c["groups"] * c["cog"]
    x = _rand(rng, (c["batch"], c_in, *c["sp"]), c["x_dtype"])
    w = _rand(rng, (c_out, c["cg"], *c["k"]), c["w_dtype"])
    x_zp = int(_rand(rng, (), c["x_dtype"]))
    w_zp = _rand(rng, (c_out,) if c["per_channel"] else (), c["w_dtype"]).astype(np.int64)
    packed = pack_conv_weights(w, w_zp, c["groups"])
    out = conv(x, x_zp, packed, c["strides"], c["dil"], c["begin"], c["end"], use_vnni=use_vnni)
    want = naive.conv_integer(x, x_zp, w, w_zp, c["groups"], c["strides"], c["dil"], c["begin"],
                              c["end"])
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("use_vnni", PATHS)
@settings(max_examples=40, deadline=None)
@given(case=conv_cases())
def test_conv_matches_naive(use_vnni, case):
    _run_case(case, use_vnni)


@settings(max_examples=6, deadline=None)
@given(case=conv_cases(max_spatial=3))
def test_conv_3d_matches_naive(case):
    _run_case(case, None)


@pytest.mark.parametrize("use_vnni", PATHS)
def test_depthwise_distinct_per_channel_weight_zero_points(use_vnni, rng):
    c = 19
    x = _rand(rng, (2, c, 9, 8), np.uint8)
    w = _rand(rng, (c, 1, 3, 3), np.int8)
    w_zp = np.arange(c) * 13 - 120  # every channel different
    packed = pack_conv_weights(w, w_zp, c)
    assert packed.depthwise
    out = conv(x, 77, packed, (1, 1), (1, 1), (1, 1), (1, 1), use_vnni=use_vnni)
    np.testing.assert_array_equal(out, naive.conv_integer(x, 77, w, w_zp, c, begin=(1, 1),
                                                          end=(1, 1)))


@pytest.mark.parametrize("use_vnni", PATHS)
def test_grouped_conv_distinct_per_channel_weight_zero_points(use_vnni, rng):
    g, cg, cog = 3, 5, 7
    x = _rand(rng, (1, g * cg, 7, 6), np.int8)
    w = _rand(rng, (g * cog, cg, 3, 3), np.uint8)
    w_zp = (np.arange(g * cog) * 11) % 256
    packed = pack_conv_weights(w, w_zp, g)
    assert not packed.depthwise
    out = conv(x, -9, packed, (2, 1), (1, 1), (0, 1), (2, 0), use_vnni=use_vnni)
    np.testing.assert_array_equal(out, naive.conv_integer(
        x, -9, w, w_zp, g, (2, 1), (1, 1), (0, 1), (2, 0)))


@pytest.mark.parametrize("use_vnni", PATHS)
@pytest.mark.parametrize("groups", [1, 4])
def test_conv_pads_with_input_zero_point(use_vnni, groups):
    """A constant input equal to its zero point convolves to exactly 0, padding included."""
    x = np.full((1, 4, 5, 5), 131, np.uint8)
    w = np.full((8, 4 // groups, 3, 3), 5, np.int8)
    packed = pack_conv_weights(w, 0, groups)
    out = conv(x, 131, packed, (1, 1), (1, 1), (2, 1), (1, 2), use_vnni=use_vnni)
    assert out.shape == (1, 8, 6, 6)
    assert not out.any()


def test_resolve_pads_auto_pad():
    assert resolve_pads("SAME_UPPER", (7,), (4,), (2,), (1,), None) == ((1,), (2,))
    assert resolve_pads("SAME_LOWER", (7,), (4,), (2,), (1,), None) == ((2,), (1,))
    assert resolve_pads("VALID", (7, 7), (3, 3), (1, 1), (1, 1), [1, 1, 1, 1]) == ((0, 0), (0, 0))
    assert resolve_pads("NOTSET", (7, 7), (3, 3), (1, 1), (1, 1), [1, 2, 3, 4]) == ((1, 2), (3, 4))


@pytest.mark.parametrize("x_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("pads", [(0, 0, 0, 0), (1, 2, 2, 1)])
def test_conv_word_transpose_path(x_dtype, pads, rng):
    """C % 8 == 0 and W % 8 == 0 take the 8x8-byte-block input transpose."""
    x = _rand(rng, (2, 16, 5, 16), x_dtype)
    w = _rand(rng, (24, 16, 3, 3), np.int8)
    w_zp = _rand(rng, 24, np.int8).astype(np.int64)
    packed = pack_conv_weights(w, w_zp, 1)
    out = conv(x, 9, packed, (1, 2), (1, 1), pads[:2], pads[2:])
    np.testing.assert_array_equal(out, naive.conv_integer(x, 9, w, w_zp, 1, (1, 2), (1, 1),
                                                          pads[:2], pads[2:]))


@pytest.mark.parametrize("use_vnni", PATHS)
@settings(max_examples=25, deadline=None)
@given(case=conv_cases(), strides=st.tuples(st.integers(1, 3), st.integers(2, 3)))
def test_strided_pointwise_conv_samples_its_input(use_vnni, case, strides):
    """A 1x1 strided convolution without padding transposes only the pixels it reads
    (the buffer holds every s-th row and column); any W, odd sizes, groups, dilation."""
    nd = len(case["sp"])
    case = dict(case, k=(1,) * nd, begin=(0,) * nd, end=(0,) * nd,
                strides=strides[-nd:], cog=max(case["cog"], 1))
    if case["cg"] == 1 and case["groups"] > 1:  # keep the GEMM path (not depthwise)
        case["cg"] = 2
    _run_case(case, use_vnni)


@pytest.mark.parametrize("x_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("c_in,w_in,pads", [
    (16, 16, (0, 0, 0, 0)), (32, 56, (1, 1, 1, 1)), (48, 17, (0, 2, 1, 0)),
    (16, 5, (1, 0, 0, 1)), (64, 31, (0, 0, 0, 0)),
])
def test_conv_vector_block_transpose_path(x_dtype, c_in, w_in, pads, rng):
    """C % 16 == 0 takes the 16x16 vector-block input transpose; widths that are not a
    multiple of 16 end with an overlapping block (or, under 16, pixel by pixel)."""
    x = _rand(rng, (2, c_in, 6, w_in), x_dtype)
    w = _rand(rng, (24, c_in, 3, 1), np.int8)
    w_zp = _rand(rng, 24, np.int8).astype(np.int64)
    packed = pack_conv_weights(w, w_zp, 1)
    out = conv(x, 9, packed, (1, 1), (1, 1), pads[:2], pads[2:])
    np.testing.assert_array_equal(out, naive.conv_integer(x, 9, w, w_zp, 1, (1, 1), (1, 1),
                                                          pads[:2], pads[2:]))


def test_transpose16_moves_a_block_with_strides_and_the_flip():
    from numba import njit

    from qlinear.runtime.kernels.byte_transpose import transpose16

    @njit
    def run(src, so, ss, dst, do, ds, flip):
        transpose16(src, so, ss, dst, do, ds, flip)

    rng = np.random.default_rng(5)
    src = rng.integers(0, 256, 40 * 16 + 7, dtype=np.uint8)
    dst = np.zeros(16 * 24 + 3, np.uint8)
    run(src, 7, 40, dst, 3, 24, np.uint8(0x80))
    block = src[7:7 + 40 * 16].reshape(16, 40)[:, :16]
    got = dst[3:3 + 24 * 16].reshape(16, 24)[:, :16]
    np.testing.assert_array_equal(got, block.T ^ 0x80)
    assert not dst[3 + 16 : 3 + 24].any()  # nothing written between the rows


# --------------------------------------------------------------------------- NHWC


@pytest.mark.parametrize("kernels", ["auto", "portable"])
@pytest.mark.parametrize("x_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize(
    "c_in,c_out,group,k,stride,dil,pads",
    [
        (24, 24, 24, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),  # depthwise, row kernel
        (20, 20, 20, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1)),  # depthwise stride 2
        (16, 16, 16, (3, 3), (1, 1), (2, 2), (2, 2, 2, 2)),  # depthwise dilated
        (8, 8, 8, (5, 2), (1, 1), (1, 1), (2, 0, 2, 1)),  # depthwise, kw != 3
        (6, 6, 6, (3, 3), (1, 1), (1, 1), (0, 0, 0, 0)),  # depthwise, no padding
        (4, 8, 4, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),  # channel multiplier 2
        (16, 24, 1, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0)),  # 1x1, reads x directly
        (3, 32, 1, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1)),  # channel padding to 4
        (8, 12, 2, (3, 3), (1, 2), (1, 1), (0, 1, 1, 0)),  # grouped
    ],
)
def test_conv_nhwc_plans_and_buffers(kernels, x_dtype, c_in, c_out, group, k, stride, dil, pads,
                                     rng, monkeypatch):
    """conv_nhwc against the naive conv: planned once per shape, padded buffers reused
    (border filled once with the zero point), new data and a new shape both right."""
    from qlinear.runtime.kernels.nhwc import conv_nhwc

    monkeypatch.setenv("QLINEAR_KERNELS", kernels)
    w = _rand(rng, (c_out, c_in // group, *k), np.int8)
    w_zp = rng.integers(-5, 6, c_out)
    packed = pack_conv_weights(w, w_zp, group)
    info = np.iinfo(x_dtype)
    x_zp = int(rng.integers(info.min, info.max + 1))
    bias = rng.integers(-1000, 1000, c_out).astype(np.int32)
    mult = np.full(c_out, 0.003, np.float32)
    begin, end = pads[:2], pads[2:]
    for hw in [(9, 10), (9, 10), (7, 12)]:
        x = _rand(rng, (2, c_in, *hw), x_dtype)
        xt = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        geometry = dict(group=group, strides=stride, dilations=dil, begin=begin, end=end)
        acc = naive.conv_integer(x, x_zp, w, w_zp, **geometry)
        got = conv_nhwc(xt, x_zp, packed, stride, dil, begin, end, out_dtype=np.int32)
        np.testing.assert_array_equal(got, acc.transpose(0, 2, 3, 1))
        acc_b = (acc.astype(np.int64) + bias.reshape(1, -1, 1, 1)).astype(np.int32)
        want = naive.requantize(np.moveaxis(acc_b, 1, -1), mult, 7, x_dtype)
        got = conv_nhwc(xt, x_zp, packed, stride, dil, begin, end, out_dtype=x_dtype, bias=bias,
                        mult=mult, y_zp=7)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("b,pix,ch,dtype", [
    (2, 300, 130, np.uint8),  # byte path: partial pixel and channel blocks
    (1, 264, 136, np.uint8),  # 8 x 8 word path, several channel blocks
    (1, 196, 1024, np.uint8),  # 14 x 14 x 1024: one pixel block, 16 channel blocks
    (2, 70, 67, np.int32),
])
def test_rows_to_nchw_splits_pixels_and_channels_exactly(b, pix, ch, dtype):
    from qlinear.runtime.kernels.conv import _to_nchw

    rng = np.random.default_rng(pix)
    rows = rng.integers(0, 255, (b, pix, ch)).astype(dtype)
    before = config.num_threads()
    try:
        for threads in (1, 2):
            config.set_num_threads(threads)
            out = np.empty((b, ch, pix), dtype)
            _to_nchw(rows, out)
            np.testing.assert_array_equal(out, rows.transpose(0, 2, 1))
    finally:
        config.set_num_threads(before)
