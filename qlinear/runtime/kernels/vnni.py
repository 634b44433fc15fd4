"""The VNNI micro-kernel: MR rows x 64 columns of int32, uint8 x int8 dot products.

numba's LLVM never emits `vpdpbusd` from plain loops, so the whole register-blocked
tile is written as LLVM IR in a numba ``@intrinsic``: MR x 4 accumulators of
``<16 x i32>`` live in zmm registers for the whole reduction, each step broadcasts
4 activation bytes per row and multiplies them with 4 x 64 packed weight bytes.

Layouts (all byte offsets):
  * activations ``a`` (uint8, flat): row r of the tile starts at ``row_off[r]``; the
    reduction walks ``for t in taps: for q in range(c4): a[row_off[r] + taps[t] + a_step*q : +4]``
    (a GEMM is one tap at 0 over A packed per call as [tile][K/4][MR][4], a_step = 4*MR,
    one contiguous stream; an implicit-GEMM convolution has one tap per kernel position
    over a padded NHWC buffer and a_step = 4).
  * weights ``b`` (int8, flat) from ``b_off``: [T*c4][64][4], i.e. per reduction step
    the 64 columns' 4 bytes, contiguous (256 bytes).
  * ``tile`` (int32, flat): overwritten with [MR][64].

If the host lacks AVX512-VNNI (see config.host_has_vnni) the same intrinsic emits a
generic widening multiply-add instead of `vpdpbusd`, because asking LLVM for the
instruction there aborts the process. Callers still select the portable kernel on such
hosts; the fallback only makes compiling the shared driver safe everywhere.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from qlinear.runtime.kernels.config import host_has_vnni

#: Register block: rows per tile (MR) and columns per tile (NR = 4 zmm of int32).
MAX_ROWS = 6
TILE_COLS = 64
STEP_BYTES = TILE_COLS * 4  # packed weight bytes per reduction step

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V16 = ir.VectorType(_I32, 16)


def _dpbusd_native(builder: ir.IRBuilder, acc, a, b):
    fnty = ir.FunctionType(_V16, [_V16, _V16, _V16])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
    return builder.call(fn, [acc, a, b])


def _dpbusd_generic(builder: ir.IRBuilder, acc, a, b):
    v64i8 = ir.VectorType(_I8, 64)
    v64i32 = ir.VectorType(_I32, 64)
    a32 = builder.zext(builder.bitcast(a, v64i8), v64i32)
    b32 = builder.sext(builder.bitcast(b, v64i8), v64i32)
    prod = builder.mul(a32, b32)
    out = acc
    for lane in range(4):
        mask = ir.Constant(ir.VectorType(_I32, 16), [4 * i + lane for i in range(16)])
        part = builder.shuffle_vector(prod, ir.Constant(v64i32, ir.Undefined), mask)
        out = builder.add(out, part)
    return out


def _make_tile_kernel(rows: int):
    dpbusd = _dpbusd_native if host_has_vnni() else _dpbusd_generic

    @intrinsic
    def tile_kernel(typingctx, a, row_off, taps, c4, a_step, b, b_off, tile):
        sig = types.void(a, row_off, taps, c4, a_step, b, b_off, tile)

        def codegen(context, builder, signature, args):
            a_v, row_v, taps_v, c4_v, step_v, b_v, boff_v, tile_v = args
            a_ty, row_ty, taps_ty, c4_ty, step_ty, b_ty, boff_ty, tile_ty = signature.args
            a_ptr = context.make_array(a_ty)(context, builder, a_v).data
            row_ptr = context.make_array(row_ty)(context, builder, row_v).data
            taps_arr = context.make_array(taps_ty)(context, builder, taps_v)
            b_ptr = context.make_array(b_ty)(context, builder, b_v).data
            tile_ptr = context.make_array(tile_ty)(context, builder, tile_v).data
            n_taps = builder.extract_value(taps_arr.shape, 0)
            c4 = context.cast(builder, c4_v, c4_ty, types.int64)
            a_step = context.cast(builder, step_v, step_ty, types.int64)
            b_off = context.cast(builder, boff_v, boff_ty, types.int64)
            a_bytes = builder.bitcast(a_ptr, _I8.as_pointer())
            b_bytes = builder.bitcast(b_ptr, _I8.as_pointer())
            rows_off = [
                builder.load(builder.gep(row_ptr, [ir.Constant(_I64, r)])) for r in range(rows)
            ]
            zero = ir.Constant(_V16, [0] * 16)
            accs = [cgutils.alloca_once_value(builder, zero) for _ in range(rows * 4)]
            b_cur = cgutils.alloca_once_value(builder, b_off)
            with cgutils.for_range(builder, n_taps) as tap_loop:
                tap = builder.load(builder.gep(taps_arr.data, [tap_loop.index]))
                with cgutils.for_range(builder, c4) as k_loop:
                    k_off = builder.add(tap, builder.mul(k_loop.index, a_step))
                    boff = builder.load(b_cur)
                    bvecs = []
                    for j in range(4):
                        p = builder.gep(b_bytes, [builder.add(boff, ir.Constant(_I64, 64 * j))])
                        bvecs.append(builder.load(builder.bitcast(p, _V16.as_pointer()), align=1))
                    for r in range(rows):
                        p = builder.gep(a_bytes, [builder.add(rows_off[r], k_off)])
                        word = builder.load(builder.bitcast(p, _I32.as_pointer()), align=1)
                        one = builder.insert_element(
                            ir.Constant(_V16, ir.Undefined), word, ir.Constant(_I32, 0)
                        )
                        splat = builder.shuffle_vector(
                            one, ir.Constant(_V16, ir.Undefined), ir.Constant(_V16, [0] * 16)
                        )
                        for j in range(4):
                            slot = accs[r * 4 + j]
                            builder.store(
                                dpbusd(builder, builder.load(slot), splat, bvecs[j]), slot
                            )
                    builder.store(builder.add(boff, ir.Constant(_I64, STEP_BYTES)), b_cur)
            tile_i32 = builder.bitcast(tile_ptr, _I32.as_pointer())
            for r in range(rows):
                for j in range(4):
                    p = builder.gep(tile_i32, [ir.Constant(_I64, r * 64 + j * 16)])
                    builder.store(
                        builder.load(accs[r * 4 + j]),
                        builder.bitcast(p, _V16.as_pointer()),
                        align=4,
                    )
            return context.get_dummy_value()

        return sig, codegen

    tile_kernel.__name__ = f"vnni_tile_{rows}x64"
    return tile_kernel


vnni_tile_1x64 = _make_tile_kernel(1)
vnni_tile_2x64 = _make_tile_kernel(2)
vnni_tile_3x64 = _make_tile_kernel(3)
vnni_tile_4x64 = _make_tile_kernel(4)
vnni_tile_5x64 = _make_tile_kernel(5)
vnni_tile_6x64 = _make_tile_kernel(6)
