"""Depthwise int8 convolution: one register-blocked kernel for the NHWC and NCHW paths.

Input: channels-last bytes [B, H, W, Cs], *unpadded*, uint8 or int8 as they are (Cs,
the channel stride, is a multiple of 16 and >= C). The NHWC path reads the activations
in place when C % 16 == 0 (otherwise, and for channel multipliers > 1,
`channels_last_input` copies them); the NCHW path transposes into such a buffer. Spatial
padding never exists in memory: a tap outside the image reads a vector of the input
zero point instead.

Arithmetic (design §2): weights are centered per output channel, w - w_zp[c] (int16, so
distinct per-channel weight zero points cost nothing); acc[c] = col[c] + sum_t x[t, c] *
(w[t, c] - w_zp[c]) with col[c] = bias[c] - x_zp * sum_t (w[t, c] - w_zp[c]) is exactly
sum (x - x_zp)(w - w_zp[c]) + bias, padding included (a padded tap reads x_zp). int8
inputs are sign-extended instead of zero-extended, with their own (signed) zero point.

Micro-kernel (`dw_tile`, LLVM IR in a numba intrinsic, like vnni.py): P output pixels x
32 channels (a last block of 16 when Cs % 32 == 16). Per pixel two <16 x i32>
accumulators stay in registers across all taps, one for the even and one for the odd
channels of the block: per tap and pixel, 32 input bytes are widened to 32 x i16 once
and multiplied-added (`pmaddwd`: lane k = x[2k] w[2k] + x[2k+1] w[2k+1]) with two weight
vectors that hold the block's even (resp. odd) channel weights and zeros between them.
That is 1 widening + 2 multiply-adds per 32 MACs (LLVM fuses pmaddwd + add into
`vpdpwssd` on AVX512-VNNI hosts; the intrinsic is `pmaddwd`, never a VNNI one, so it
compiles on any AVX512BW host; without AVX512BW the same IR is built from plain vector
operations). Per-channel constants (column term, multipliers) are stored in the same
even/odd order; the epilogue requantizes in registers (exactly
`requant.requantize_byte`'s float32 operations, in its order), interleaves even and odd
channels back and stores the block's bytes (int32 and float32 outputs likewise; a block
past the real channel count stores only the real channels).

Driver: one task per (image, output row, chunk of channel blocks). A row is cut into
blocks of P_MAX = 7 pixels (3 and 1 for the rest); the tap offsets are computed once per
row, a block only shifts them. Blocks whose pixels all read inside the input row test
each tap once (its row may be outside the image: then the whole block reads the
zero-point vector), the border blocks test every pixel's column.

Also here: byte transposes between NCHW planes and channels-last pixels (16 x 64 and
16 x 16 tiles transposed in registers, `planes_to_pixels` / `pixels_to_planes`), which
the NCHW depthwise path uses on both sides of the kernel.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from qlinear.runtime.kernels import config
from qlinear.runtime.kernels.config import JIT
from qlinear.runtime.kernels.parallel import claim, finish, run_tasks
from qlinear.runtime.kernels.requant import (
    OUT_INT32,
    OUT_QUANTIZED,
    requantize_ir,
)

#: Channel padding unit, widest block (channels), and output pixels per block (the
#: kernel is compiled for 1, 3 and P_MAX pixels; 7 x 2 accumulators fit the registers,
#: and 7 divides the rows of typical CNNs: 7, 14, 28, 56, 112).
UNIT = 16
BLOCK = 32
P_MAX = 7
#: `variant` bits of `dw_tile`: sign-extend the input bytes (int8 activations); check
#: every pixel's tap columns (blocks at the left/right border).
SIGNED = 1
CHECKED = 2
#: The (pixels, checked) combinations the kernel is compiled for.
_SHAPES = ((P_MAX, False), (P_MAX, True), (3, False), (3, True), (1, True))
#: Cost of one depthwise multiply-add / one copied byte, in the unit `run_tasks` uses
#: (VNNI multiply-adds, as conv.BYTE_WORK).
DEPTHWISE_WORK = 16
COPY_WORK = 32
#: Aim for at least this many tasks per call (rows x channel chunks) so threads balance.
MIN_TASKS = 16

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()


def channel_stride(c: int) -> int:
    """Channels rounded up to whole 16-channel units."""
    return -(-c // UNIT) * UNIT


def _vec(t, n):
    return ir.VectorType(t, n)


def _const_vec(t, n, v):
    return ir.Constant(_vec(t, n), [v] * n)


def _pmaddwd_native(builder, acc, x, w):
    """acc + pmaddwd(x, w) with the x86 intrinsic (<2n x i16> pairs -> <n x i32>)."""
    n = acc.type.count
    name = "llvm.x86.avx512.pmaddw.d.512" if n == 16 else "llvm.x86.avx2.pmadd.wd"
    fnty = ir.FunctionType(acc.type, [x.type, w.type])
    return builder.add(acc, builder.call(
        cgutils.get_or_insert_function(builder.module, fnty, name), [x, w]))


def _pmaddwd_generic(builder, acc, x, w):
    """acc + pmaddwd(x, w) in plain vector IR (any target)."""
    n = acc.type.count
    undef = ir.Constant(x.type, ir.Undefined)
    out = acc
    for lane in range(2):
        mask = ir.Constant(_vec(_I32, n), [2 * i + lane for i in range(n)])
        xs = builder.sext(builder.shuffle_vector(x, undef, mask), acc.type)
        ws = builder.sext(builder.shuffle_vector(w, undef, mask), acc.type)
        out = builder.add(out, builder.mul(xs, ws))
    return out


def _host_pmaddwd():
    """The multiply-add the kernel is compiled with: pmaddwd when the host has AVX512BW
    (never a VNNI intrinsic: LLVM fuses pmaddwd + add into vpdpwssd where it exists),
    plain vector IR otherwise (tests compare the two)."""
    feats = config.host_cpu_features()
    return _pmaddwd_native if "avx512bw" in feats and "avx2" in feats else _pmaddwd_generic


def _dw_tile_codegen(context, builder, signature, args):
    """IR of `dw_tile`: a switch over (pixels, variant); each case walks the channel
    blocks of units [u0, u1) (32 channels, then a last 16 if the count of units is odd)."""
    sa = signature.args

    def ptr(i, ty):
        return builder.bitcast(context.make_array(sa[i])(context, builder, args[i]).data,
                               ty.as_pointer())

    def i64(i):
        return context.cast(builder, args[i], sa[i], types.int64)

    npix, variant = i64(0), i64(5)
    x_ptr, zp_ptr = ptr(1, _I8), ptr(2, _I8)
    offs_arr = context.make_array(sa[3])(context, builder, args[3])
    n_taps = builder.extract_value(offs_arr.shape, 1)
    pstep = i64(4)
    col_step, img_w, oshift, cshift = i64(20), i64(21), i64(22), i64(23)
    wt_ptr, wstride = ptr(6, _I16), i64(7)
    col_ptr, mult_ptr, fs_ptr, fb_ptr = ptr(8, _I32), ptr(9, _F32), ptr(10, _F32), ptr(11, _F32)
    u0, u1, c_n, mode = i64(12), i64(13), i64(14), i64(15)
    out_ptr, out_off, out_pstep = ptr(16, _I8), i64(17), i64(18)
    qp_ptr = ptr(19, _F32)
    zero = ir.Constant(_I64, 0)

    def const(v):
        return ir.Constant(_I64, v)

    accs = {w: [[cgutils.alloca_once(builder, _vec(_I32, w // 2)) for _ in range(2)]
                for _ in range(P_MAX)] for w in (BLOCK, UNIT)}
    spill = cgutils.alloca_once(builder, _vec(_I32, BLOCK))  # partial-block stores

    def load_vec(base, index, ty, align):
        return builder.load(builder.bitcast(builder.gep(base, [index]), ty.as_pointer()),
                            align=align)

    def block(pixels, checked, width, c0, extend, madd):
        half = width // 2
        acc_ty = _vec(_I32, half)
        x_ty, w_ty = _vec(_I8, width), _vec(_I16, width)
        acc = accs[width]
        for par in range(2):
            start = load_vec(col_ptr, builder.add(c0, const(par * half)), acc_ty, 4)
            for p in range(pixels):
                builder.store(start, acc[p][par])
        zp_vec = builder.gep(zp_ptr, [c0])
        with cgutils.for_range(builder, n_taps) as loop:
            t = loop.index
            o = builder.add(builder.load(builder.gep(offs_arr.data, [t])), oshift)
            col0 = builder.add(
                builder.load(builder.gep(offs_arr.data, [builder.add(t, n_taps)])), cshift)
            base = builder.gep(x_ptr, [builder.add(o, c0)])
            if not checked:
                # every pixel's column is inside: one test for the tap's row
                ok0 = builder.icmp_unsigned("<", col0, img_w)
                base = builder.select(ok0, base, zp_vec)
                step = builder.select(ok0, pstep, zero)
            wrow = builder.add(builder.mul(t, wstride), builder.mul(c0, const(2)))
            wv = [load_vec(wt_ptr, builder.add(wrow, const(par * width)), w_ty, 2)
                  for par in range(2)]
            for p in range(pixels):
                if checked:
                    # pixel p's column (huge when the row is outside) inside [0, img_w)
                    iw = builder.add(col0, builder.mul(col_step, const(p)))
                    ok = builder.icmp_unsigned("<", iw, img_w)
                    src = builder.select(
                        ok, builder.gep(base, [builder.mul(pstep, const(p))]), zp_vec)
                else:
                    src = builder.gep(base, [builder.mul(step, const(p))])
                xb = builder.load(builder.bitcast(src, x_ty.as_pointer()), align=1)
                xw = extend(xb, w_ty)
                for par in range(2):
                    slot = acc[p][par]
                    builder.store(madd(builder, builder.load(slot), xw, wv[par]), slot)
        # epilogue: even/odd accumulators -> channel order, per output mode
        inter = ir.Constant(_vec(_I32, width), [i // 2 + (i % 2) * half for i in range(width)])
        f_ty = _vec(_F32, half)

        def per_channel(base_ptr, ty):
            return [load_vec(base_ptr, builder.add(c0, const(par * half)), ty, 4)
                    for par in range(2)]

        remaining = builder.sub(c_n, c0)
        full = builder.icmp_signed(">=", remaining, const(width))
        accs_v = [(builder.load(acc[p][0]), builder.load(acc[p][1])) for p in range(pixels)]
        elems = [builder.add(builder.add(out_off, builder.mul(out_pstep, const(p))), c0)
                 for p in range(pixels)]
        # one branch on the mode, one on the block being whole: each pixel loop is one
        # basic block (the pixels' conversions interleave, accumulators stay in registers)
        is_q = builder.icmp_signed("==", mode, const(OUT_QUANTIZED))
        is_i = builder.icmp_signed("==", mode, const(OUT_INT32))
        with builder.if_else(is_q) as (then_q, else_q):
            with then_q:
                mult = per_channel(mult_ptr, f_ty)
                zp_f, lo, hi = (load_vec(qp_ptr, const(i * UNIT), f_ty, 4) for i in range(3))
                zp_i = builder.fptosi(zp_f, accs_v[0][0].type)
                vals = []
                for ae, ao in accs_v:
                    qe = requantize_ir(builder, ae, mult[0], lo, hi, zp_i)
                    qo = requantize_ir(builder, ao, mult[1], lo, hi, zp_i)
                    # bytes of channels 2k, 2k+1 into 16-bit lane k: channel order
                    low = builder.and_(qe, _const_vec(_I32, half, 0xFF))
                    pair = builder.or_(low, builder.shl(qo, _const_vec(_I32, half, 8)))
                    vals.append(builder.trunc(pair, _vec(_I16, half)))
                store(vals, elems, 1, full, remaining)
            with else_q:
                with builder.if_else(is_i) as (then_i, else_i):
                    with then_i:
                        store([builder.shuffle_vector(ae, ao, inter) for ae, ao in accs_v],
                              elems, 4, full, remaining)
                    with else_i:
                        fs, fb = per_channel(fs_ptr, f_ty), per_channel(fb_ptr, f_ty)
                        vals = []
                        for ae, ao in accs_v:
                            fe = builder.fadd(builder.fmul(builder.sitofp(ae, f_ty), fs[0]), fb[0])
                            fo = builder.fadd(builder.fmul(builder.sitofp(ao, f_ty), fs[1]), fb[1])
                            vals.append(builder.shuffle_vector(fe, fo, inter))
                        store(vals, elems, 4, full, remaining)

    def store(vals, elems, esize, full, remaining):
        """vals[p] (a block's channels, esize bytes each) to out at element elems[p]; only
        the first `remaining` channels when the block runs past the real channel count."""
        dsts = [builder.gep(out_ptr, [builder.mul(e, const(esize))]) for e in elems]
        with builder.if_else(full) as (then, otherwise):
            with then:
                for vec, dst in zip(vals, dsts, strict=True):
                    builder.store(vec, builder.bitcast(dst, vec.type.as_pointer()), align=1)
            with otherwise:
                nbytes = builder.mul(remaining, const(esize))
                for vec, dst in zip(vals, dsts, strict=True):
                    builder.store(vec, builder.bitcast(spill, vec.type.as_pointer()), align=4)
                    cgutils.raw_memcpy(builder, dst, builder.bitcast(spill, _I8.as_pointer()),
                                       nbytes, 1)

    def body(pixels, checked, extend):
        pairs = builder.sdiv(builder.sub(u1, u0), const(2))
        with cgutils.for_range(builder, pairs) as loop:
            c0 = builder.mul(builder.add(u0, builder.mul(loop.index, const(2))), const(UNIT))
            block(pixels, checked, BLOCK, c0, extend, madd)
        odd = builder.icmp_signed("!=", builder.srem(builder.sub(u1, u0), const(2)), zero)
        with builder.if_then(odd):
            c0 = builder.mul(builder.sub(u1, const(1)), const(UNIT))
            block(pixels, checked, UNIT, c0, extend, madd)

    madd = _host_pmaddwd()
    done = builder.append_basic_block("dw_done")
    cases = []
    for pixels, checked in _SHAPES:
        for signed in (0, SIGNED):
            var = signed | (CHECKED if checked else 0)
            cases.append((pixels * 4 + var, pixels, checked, signed,
                          builder.append_basic_block(f"dw_{pixels}_{var}")))
    switch = builder.switch(builder.add(builder.mul(npix, const(4)), variant), cases[0][4])
    for key, _, _, _, bb in cases:
        switch.add_case(ir.Constant(_I64, key), bb)
    for _, pixels, checked, signed, bb in cases:
        builder.position_at_end(bb)
        body(pixels, checked, builder.sext if signed else builder.zext)
        builder.branch(done)
    builder.position_at_end(done)
    return context.get_dummy_value()


@intrinsic
def dw_tile(typingctx, npix, x, zp, offs, pstep, variant, wt, wstride, col, mult, fscale,
            fbias, u0, u1, c_n, mode, out, out_off, out_pstep, qparams, col_step, width, oshift,
            cshift):
    """The micro-kernel: `npix` (1, 3 or P_MAX) output pixels x the channel blocks of the
    16-channel units [u0, u1) (u0 even; see the module docstring for the layouts).

    Tap t of pixel p reads the 16/32 bytes of its channel block c at x[offs[0, t] + oshift
    + p * pstep + c], or the zero-point vector zp[c:] when its input column
    offs[1, t] + cshift + p * col_step is not in [0, width) (offs[1, t] is huge when the
    tap's input row is outside the image). Without the CHECKED bit in `variant` only the
    first pixel's column is tested (all pixels inside, or the whole row outside); SIGNED
    sign-extends the input bytes. Weights wt[t * wstride + 2 c:] (even then odd vector);
    the accumulators start from col[c:]; the output element out_off + p * out_pstep + c
    (out is the output as bytes) is written for channels c < c_n only: mode
    OUT_QUANTIZED (mult; qparams = y_zp, lo, hi as float32, each repeated 16 times),
    OUT_INT32, or else float32 acc * fscale + fbias.
    """
    sig = types.void(npix, x, zp, offs, pstep, variant, wt, wstride, col, mult, fscale, fbias,
                     u0, u1, c_n, mode, out, out_off, out_pstep, qparams, col_step, width,
                     oshift, cshift)
    return sig, _dw_tile_codegen


#: Column of a tap whose input row is outside the image: no pixel's column passes the
#: kernel's unsigned `column < width` test.
_NO_ROW = 1 << 62


@njit(**JIT)
def _row_blocks(ow_n, left, right):
    """The pixel blocks of an output row as (first pixel, pixels, CHECKED or 0) rows:
    blocks of P_MAX, the rest in blocks of 3 and single pixels; a block is checked unless
    all its pixels' taps fall inside the input row ([left, right))."""
    blocks = np.empty((ow_n, 3), np.int64)
    nb = 0
    ow0 = 0
    while ow0 < ow_n:
        rest = ow_n - ow0
        n = P_MAX if rest >= P_MAX else (3 if rest >= 3 else 1)
        inside = left <= ow0 and ow0 + n <= right
        blocks[nb, 0], blocks[nb, 1] = ow0, n
        blocks[nb, 2] = 0 if inside and n > 1 else CHECKED
        nb += 1
        ow0 += n
    return blocks[:nb]


@njit(**JIT)
def _depthwise(counters, x, dims, geo, zp, signed, wt, col, mult, fscale, fbias, qparams,
               nchunk, chunk_units, mode, out):
    """Depthwise conv of x [B, H, W, Cs] (flat bytes, `dims` = B, H, W, Cs) into output
    rows [B, OH, OW, C] (flat bytes); one task per (image, output row, channel chunk).

    geo = kh, kw, sh, sw, dh, dw, pad_top, pad_left, OH, OW, C.
    """
    h, w, cs = dims[1], dims[2], dims[3]
    kh, kw, sh, sw, dh, dw, pt, pl, oh_n, ow_n, c_n = (
        geo[0], geo[1], geo[2], geo[3], geo[4], geo[5], geo[6], geo[7], geo[8], geo[9], geo[10]
    )
    n_units = col.shape[0] // UNIT
    taps = kh * kw
    wstride = wt.shape[0] // taps
    # output pixels whose taps all fall inside the input row: [left, right)
    left = min((pl + sw - 1) // sw, ow_n)
    span = w - 1 + pl - (kw - 1) * dw
    right = max(min(span // sw + 1 if span >= 0 else 0, ow_n), left)
    blocks = _row_blocks(ow_n, left, right)
    # per tap, for output pixel 0 of the row: the byte offset of its input pixel and its
    # input column (_NO_ROW when the input row is outside the image); a block starting
    # at pixel ow0 shifts both
    offs = np.empty((2, taps), np.int64)
    rows = dims[0] * oh_n
    ntasks = rows * nchunk
    while True:
        task = claim(counters)
        if task >= ntasks:
            break
        # chunk-major: consecutive tasks reuse one chunk's weights (hot in L1)
        chunk = task // rows
        row = task - chunk * rows
        bi = row // oh_n
        oh = row - bi * oh_n
        u0 = chunk * chunk_units
        u1 = min(n_units, u0 + chunk_units)
        obase = row * ow_n * c_n
        for i in range(kh):
            ih = oh * sh - pt + i * dh
            inside = 0 <= ih < h
            for j in range(kw):
                iw = j * dw - pl
                offs[0, i * kw + j] = ((bi * h + ih) * w + iw) * cs if inside else 0
                offs[1, i * kw + j] = iw if inside else _NO_ROW
        for k in range(blocks.shape[0]):
            ow0 = blocks[k, 0]
            dw_tile(blocks[k, 1], x, zp, offs, sw * cs, signed | blocks[k, 2], wt, wstride,
                    col, mult, fscale, fbias, u0, u1, c_n, mode, out, obase + ow0 * c_n, c_n,
                    qparams, sw, w, ow0 * sw * cs, ow0 * sw)
        finish(counters)


@njit(**JIT)
def _gather_channels(counters, x, mult, out):
    """out[b, i, j, c] = x[b, i, j, c // mult] for c < C_in * mult, one input row per task
    (the channel padding of `out` is left as it is: its weights are 0)."""
    nb, h, w, c_in = x.shape
    cs = out.shape[3]
    c_out = c_in * mult
    xf = x.reshape(-1)
    of = out.reshape(-1)
    ntasks = nb * h
    while True:
        task = claim(counters)
        if task >= ntasks:
            break
        for j in range(w):
            src = (task * w + j) * c_in
            dst = (task * w + j) * cs
            if mult == 1:
                for c in range(c_in):
                    of[dst + c] = xf[src + c]
            else:
                for c in range(c_out):
                    of[dst + c] = xf[src + c // mult]
        finish(counters)


def _bitrev4(k: int) -> int:
    return int(f"{k:04b}"[::-1], 2)


def _transpose_codegen(lanes: int):
    """IR of `transpose16_<16 lanes>`: a 16 x (16 lanes) byte tile to (16 lanes) x 16.

    Four stages of interleaving (bytes, words, dwords, qwords; x86 unpack instructions,
    which work within each 16-byte lane); vector k then holds, per lane L, the tile's
    column 16 L + bitrev4(k)."""
    width = 16 * lanes
    v_ty = _vec(_I8, width)

    def unpack_mask(e, hi):
        mask = []
        for lane in range(lanes):
            base = 16 * lane + (8 if hi else 0)
            for i in range(8 // e):
                mask += [base + i * e + t for t in range(e)]
                mask += [width + base + i * e + t for t in range(e)]
        return ir.Constant(_vec(_I32, width), mask)

    def codegen(context, builder, signature, args):
        sa = signature.args
        src = builder.bitcast(context.make_array(sa[0])(context, builder, args[0]).data,
                              _I8.as_pointer())
        dst = builder.bitcast(context.make_array(sa[3])(context, builder, args[3]).data,
                              _I8.as_pointer())
        soff, sstride, doff, dstride = (context.cast(builder, args[i], sa[i], types.int64)
                                        for i in (1, 2, 4, 5))
        rows = []
        for i in range(16):
            at = builder.add(soff, builder.mul(sstride, ir.Constant(_I64, i)))
            rows.append(builder.load(builder.bitcast(builder.gep(src, [at]),
                                                     v_ty.as_pointer()), align=1))
        for e in (1, 2, 4, 8):
            nxt = list(rows)
            for i in range(16):
                if (i // e) % 2 == 0:
                    nxt[i] = builder.shuffle_vector(rows[i], rows[i + e], unpack_mask(e, False))
                    nxt[i + e] = builder.shuffle_vector(rows[i], rows[i + e],
                                                        unpack_mask(e, True))
            rows = nxt
        for lane in range(lanes):
            pick = ir.Constant(_vec(_I32, 16), list(range(16 * lane, 16 * lane + 16)))
            for k in range(16):
                col = 16 * lane + _bitrev4(k)
                at = builder.add(doff, builder.mul(dstride, ir.Constant(_I64, col)))
                part = rows[k] if lanes == 1 else builder.shuffle_vector(
                    rows[k], ir.Constant(v_ty, ir.Undefined), pick)
                builder.store(part, builder.bitcast(builder.gep(dst, [at]),
                                                    _vec(_I8, 16).as_pointer()), align=1)
        return context.get_dummy_value()

    return codegen


def _make_transpose(lanes: int):
    @intrinsic
    def transpose16(typingctx, src, soff, sstride, dst, doff, dstride):
        """dst[doff + j * dstride + i] = src[soff + i * sstride + j] for i < 16,
        j < 16 * lanes (byte arrays)."""
        return types.void(src, soff, sstride, dst, doff, dstride), _transpose_codegen(lanes)

    return transpose16


transpose16_16 = _make_transpose(1)
transpose16_64 = _make_transpose(4)


@njit(inline="always", **JIT)
def _transpose_block(src, soff, sstride, dst, doff, dstride, n_rows, n_cols):
    """dst[doff + j * dstride + i] = src[soff + i * sstride + j], i < n_rows, j < n_cols:
    16 x 64 and 16 x 16 register tiles, the last ones of each direction overlapping their
    neighbours (rewriting equal bytes); bytewise only when a side is shorter than 16."""
    if n_rows < 16 or n_cols < 16:
        for i in range(n_rows):
            for j in range(n_cols):
                dst[doff + j * dstride + i] = src[soff + i * sstride + j]
        return
    i0 = 0
    while i0 < n_rows:
        i0 = min(i0, n_rows - 16)
        j0 = 0
        while j0 + 64 <= n_cols:
            transpose16_64(src, soff + i0 * sstride + j0, sstride, dst, doff + j0 * dstride + i0,
                           dstride)
            j0 += 64
        while j0 < n_cols:
            j0 = min(j0, n_cols - 16)
            transpose16_16(src, soff + i0 * sstride + j0, sstride, dst, doff + j0 * dstride + i0,
                           dstride)
            j0 += 16
        i0 += 16


#: Pixels per task of the transposes (a last, shorter range joins the one before it).
#: Not 64: a task then wrote one cache line per plane, shared with the neighbouring task
#: (another thread) whenever the buffer was not 64-byte aligned (conv.NCHW_BLOCK).
_TRANSPOSE_PIXELS = 256


@njit(**JIT)
def _transpose_images(counters, src, n_img, rows, cols, srow, dst, drow, by_cols):
    """Per image: dst[j * drow + i] = src[i * srow + j] (i < rows, j < cols; images of
    rows * srow bytes in src, cols * drow in dst), one range of _TRANSPOSE_PIXELS pixels per task: a
    range of columns when `by_cols` (the pixels are the columns), else of rows."""
    pix = cols if by_cols else rows
    ranges = max(1, pix // _TRANSPOSE_PIXELS)
    ntasks = n_img * ranges
    while True:
        task = claim(counters)
        if task >= ntasks:
            break
        bi = task // ranges
        k = task - bi * ranges
        p0 = k * _TRANSPOSE_PIXELS
        p1 = pix if k == ranges - 1 else p0 + _TRANSPOSE_PIXELS
        if by_cols:
            _transpose_block(src, bi * rows * srow + p0, srow, dst, bi * cols * drow + p0 * drow,
                             drow, rows, p1 - p0)
        else:
            _transpose_block(src, bi * rows * srow + p0 * srow, srow, dst, bi * cols * drow + p0,
                             drow, p1 - p0, cols)
        finish(counters)


def _transpose_tasks(pix: int) -> int:
    return max(1, pix // _TRANSPOSE_PIXELS)


def planes_to_pixels(x4: np.ndarray, cs: int) -> np.ndarray:
    """NCHW bytes [B, C, H, W] as the kernel's input [B, H, W, cs] (channel padding left
    as it is: its weights are 0)."""
    b, c, h, w = x4.shape
    out = np.empty((b, h, w, cs), np.uint8)
    run_tasks(_transpose_images, b * _transpose_tasks(h * w), x4.size * COPY_WORK,
              np.ascontiguousarray(x4).reshape(-1).view(np.uint8), np.int64(b), np.int64(c),
              np.int64(h * w), np.int64(h * w), out.reshape(-1), np.int64(cs), True)
    return out


def pixels_to_planes(rows: np.ndarray, out: np.ndarray) -> None:
    """rows [B, P, C] (1-byte elements, channels-last) -> out [B, C, *spatial]."""
    b, pix, c = rows.shape
    run_tasks(_transpose_images, b * _transpose_tasks(pix), rows.size * COPY_WORK,
              rows.reshape(-1).view(np.uint8), np.int64(b), np.int64(pix), np.int64(c),
              np.int64(c), out.reshape(-1).view(np.uint8), np.int64(pix), False)


def needs_copy(c_in: int, multiplier: int) -> bool:
    """Whether NHWC activations with c_in channels need `channels_last_input` first."""
    return multiplier != 1 or c_in % UNIT != 0


def channels_last_input(x8: np.ndarray, multiplier: int) -> np.ndarray:
    """NHWC bytes x8 [B, H, W, C_in] as the kernel's input [B, H, W, Cs]: each channel
    repeated `multiplier` times, channel stride a multiple of 16."""
    b, h, w, c_in = x8.shape
    out = np.empty((b, h, w, channel_stride(c_in * multiplier)), np.uint8)
    run_tasks(_gather_channels, b * h, out.size * COPY_WORK, np.ascontiguousarray(x8),
              np.int64(multiplier), out)
    return out


def _block_order(cp: int) -> np.ndarray:
    """perm[i] = the channel stored at position i: per block (32 channels, a last one of 16
    when cp % 32 == 16) its even channels, then its odd ones."""
    perm = np.empty(cp, np.int64)
    for c0 in range(0, cp, BLOCK):
        width = min(BLOCK, cp - c0)
        half = width // 2
        perm[c0 : c0 + half] = c0 + 2 * np.arange(half)
        perm[c0 + half : c0 + width] = c0 + 2 * np.arange(half) + 1
    return perm


def _per_channel(v, n: int, cp: int, dtype, perm: np.ndarray) -> np.ndarray:
    out = np.zeros(cp, dtype)
    if v is not None:
        out[:n] = np.broadcast_to(np.asarray(v).reshape(-1), (n,)).astype(dtype)
    return np.ascontiguousarray(out[perm])


def _weights(centered: np.ndarray, cp: int) -> np.ndarray:
    """int16 [T, 2 cp]: per block at c0 (width W), words 2 c0 + [0, W) hold the even
    channels' weights at even positions, words 2 c0 + W + [0, W) the odd channels' at odd
    positions, zeros elsewhere (so pmaddwd pairs each input word with its own weight)."""
    taps, c = centered.shape
    wp = np.zeros((taps, cp), np.int16)
    wp[:, :c] = centered
    out = np.zeros((taps, 2 * cp), np.int16)
    for c0 in range(0, cp, BLOCK):
        width = min(BLOCK, cp - c0)
        k = np.arange(width // 2)
        out[:, 2 * c0 + 2 * k] = wp[:, c0 + 2 * k]
        out[:, 2 * c0 + width + 2 * k + 1] = wp[:, c0 + 2 * k + 1]
    return out.reshape(-1)


class DepthwiseLaunch:
    """One prepared depthwise call (weights, column term, geometry, epilogue constants) for
    one input shape; `run(x, out)` is one numba launch.

    centered: int16 [T, C] (w - w_zp[c]); `x_zp`: the input zero point as the bytes are
    read (uint8, or int8 when `signed`); bias int32 [C] or None; mode OUT_INT32,
    OUT_QUANTIZED (mult, y_zp, q_range) or OUT_FLOAT (fscale, fbias).
    """

    __slots__ = ("args", "ntasks", "work", "dims")

    def __init__(self, centered: np.ndarray, kernel: tuple[int, int], strides, dilations,
                 begin, in_shape: tuple[int, int, int, int], osp: tuple[int, int], *,
                 x_zp: int, signed: bool, mode: int, bias=None, mult=None, y_zp: int = 0,
                 q_range: tuple[int, int] = (0, 255), fscale=None, fbias=None) -> None:
        taps, c = centered.shape
        b, h, w, cs = in_shape
        cp = channel_stride(c)
        if cs % UNIT or cs < cp:
            raise ValueError(f"depthwise input channel stride {cs} must be a multiple of "
                             f"{UNIT} and >= {c}")
        if taps != kernel[0] * kernel[1]:
            raise ValueError(f"{taps} weight taps for a {kernel} kernel")
        perm = _block_order(cp)
        wsum = np.asarray(centered, np.int64).sum(axis=0)
        col = _per_channel(bias, c, cp, np.int64, np.arange(cp))
        col[:c] -= int(x_zp) * wsum
        rows = b * osp[0]
        n_units = cp // UNIT
        chunk_units = -(-n_units // min(n_units, -(-MIN_TASKS // rows)))
        chunk_units += chunk_units % 2  # chunks start on 32-channel block boundaries
        nchunk = -(-n_units // chunk_units)
        lo, hi = q_range
        geo = np.array([*kernel, *strides, *dilations, *begin[:2], *osp, c], np.int64)
        self.dims = tuple(in_shape)
        self.ntasks = rows * nchunk
        self.work = b * osp[0] * osp[1] * cp * taps * DEPTHWISE_WORK
        self.args = (
            np.array(in_shape, np.int64), geo, np.full(cp, int(x_zp) & 0xFF, np.uint8),
            np.int64(SIGNED if signed else 0), _weights(centered, cp),
            np.ascontiguousarray(col.astype(np.int32)[perm]),
            _per_channel(mult, c, cp, np.float32, perm),
            _per_channel(fscale, c, cp, np.float32, perm),
            _per_channel(fbias, c, cp, np.float32, perm),
            np.repeat(np.array([y_zp, lo - y_zp, hi - y_zp], np.float32), UNIT),
            np.int64(nchunk), np.int64(chunk_units), np.int64(mode),
        )

    def run(self, x: np.ndarray, out: np.ndarray) -> None:
        """x: [B, H, W, Cs] bytes, contiguous, the planned shape; out: [B, OH, OW, C]."""
        if x.shape != self.dims or not x.flags.c_contiguous:
            raise ValueError(f"depthwise input {x.shape} is not the planned {self.dims}")
        run_tasks(_depthwise, self.ntasks, self.work, x.reshape(-1).view(np.uint8), *self.args,
                  out.reshape(-1).view(np.uint8))
