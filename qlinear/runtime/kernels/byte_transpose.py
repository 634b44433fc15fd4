"""16 x 16 byte-block transpose in vector registers, for NCHW -> channels-last copies.

Why: a convolution on NCHW input first moves it channels last; done with 8 x 8 blocks
held in uint64 words (shift-and-mask swaps) it cost ~1.3 scalar operations per byte:
163 us for a [1, 256, 56, 56] input, more than the 1x1 convolution's arithmetic after
it. numba does not vectorize a transpose (one side is always strided), so this is
LLVM IR in an ``@intrinsic``: 16 rows of 16 bytes are loaded, interleaved with their
partner row 8 away in four rounds (the classic perfect-shuffle network: after log2(16)
rounds row j holds column j), XORed with the activation flip and stored, ~0.45
instructions per byte. The IR is target-independent (`shufflevector`), so it is the
path on every CPU.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_V16 = ir.VectorType(_I8, 16)
_LO = ir.Constant(ir.VectorType(_I32, 16), [v for k in range(8) for v in (k, 16 + k)])
_HI = ir.Constant(ir.VectorType(_I32, 16), [v for k in range(8, 16) for v in (k, 16 + k)])


def _data(context, builder, aryty, ary):
    return context.make_array(aryty)(context, builder, ary).data


@intrinsic
def transpose16(typingctx, src, src_off, src_stride, dst, dst_off, dst_stride, flip):
    """dst[dst_off + j*dst_stride + i] = src[src_off + i*src_stride + j] ^ flip for
    i, j < 16 (byte offsets into 1-D uint8 arrays; the caller keeps them in bounds)."""
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array)
            and src.dtype == types.uint8 and dst.dtype == types.uint8):
        return None

    def codegen(context, builder, sig, args):
        sp = _data(context, builder, sig.args[0], args[0])
        dp = _data(context, builder, sig.args[3], args[3])
        soff, sstride, doff, dstride = (
            context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 2, 4, 5))
        flip = context.cast(builder, args[6], sig.args[6], types.uint8)
        splat = builder.insert_element(ir.Constant(_V16, None), flip, ir.Constant(_I32, 0))
        splat = builder.shuffle_vector(splat, ir.Constant(_V16, None),
                                       ir.Constant(ir.VectorType(_I32, 16), [0] * 16))
        rows = []
        for i in range(16):
            off = builder.add(soff, builder.mul(sstride, ir.Constant(soff.type, i)))
            ptr = builder.bitcast(builder.gep(sp, [off]), _V16.as_pointer())
            rows.append(builder.load(ptr, align=1))
        for _ in range(4):
            rows = [v for i in range(8)
                    for v in (builder.shuffle_vector(rows[i], rows[i + 8], _LO),
                              builder.shuffle_vector(rows[i], rows[i + 8], _HI))]
        for j in range(16):
            off = builder.add(doff, builder.mul(dstride, ir.Constant(doff.type, j)))
            ptr = builder.bitcast(builder.gep(dp, [off]), _V16.as_pointer())
            builder.store(builder.xor(rows[j], splat), ptr, align=1)
        return context.get_dummy_value()

    return types.none(src, src_off, src_stride, dst, dst_off, dst_stride, flip), codegen
