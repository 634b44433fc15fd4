"""The one requantization (and int32 -> float32) arithmetic shared by every quantized op.

Two code forms of the same arithmetic: numba scalars (`requantize_value`,
`requantize_byte`, inlined into loop kernels) and LLVM IR vectors (`requantize_ir`, used
by the register-blocked micro-kernels of `vnni` and `depthwise`); tests hold them equal
on every accumulator around the rounding ties.

ORT (MLAS) requantizes as ``y = saturate(rint(float32(acc) * mult) + y_zp)`` with
``mult = float32(float32(x_scale * w_scale[n]) / y_scale)``, clamping in float before
rounding half-to-even. We do the same operations in the same order so that results
are bit-exact. The scalar helpers are inlined into the GEMM/conv epilogues.

A GEMM can also apply a second stage to its 8-bit output, the QLinearAdd of a constant
per-column vector that follows most linear layers (`ColumnAdd`, `requantize_add`,
`requantize_add_ir`): the int8 tile is then stored once instead of written, read back
and written again by a separate elementwise pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit

from qlinear.runtime.kernels.config import JIT

#: Epilogue modes understood by the GEMM and convolution drivers.
OUT_INT32 = 0
OUT_QUANTIZED = 1
OUT_FLOAT = 2
#: 8-bit output, then a per-column `ColumnAdd` requantized again (GEMM only).
OUT_QUANTIZED_ADD = 3


def output_multiplier(
    x_scale: np.ndarray, w_scale: np.ndarray, y_scale: np.ndarray, n: int
) -> np.ndarray:
    """float32(x_scale * w_scale[n] / y_scale), in float32 and in ORT's order, per column."""
    xs = np.float32(np.asarray(x_scale, np.float32).reshape(-1)[0])
    ys = np.float32(np.asarray(y_scale, np.float32).reshape(-1)[0])
    ws = np.broadcast_to(np.asarray(w_scale, np.float32).reshape(-1), (n,))
    return np.ascontiguousarray((xs * ws) / ys, dtype=np.float32)


def float_scale(a_scale: np.ndarray, b_scale: np.ndarray, n: int) -> np.ndarray:
    """float32(a_scale * b_scale[n]): the int8 -> float32 output scale per column."""
    a = np.float32(np.asarray(a_scale, np.float32).reshape(-1)[0])
    b = np.broadcast_to(np.asarray(b_scale, np.float32).reshape(-1), (n,))
    return np.ascontiguousarray(a * b, dtype=np.float32)


#: 1.5 * 2^23: adding and subtracting it rounds a float32 |v| < 2^22 half-to-even,
#: exactly like rint, but as two vectorizable adds (MLAS uses the same trick).
ROUNDING_MAGIC = np.float32(12582912.0)


@njit(inline="always", **JIT)
def requantize_value(acc, mult, y_zp, lo, hi):
    """saturate(rint(float32(acc) * mult) + y_zp); lo/hi are float32(qmin - y_zp, qmax - y_zp).

    Clamping first keeps |v| <= 510, inside the magic-number rounding range.
    """
    v = min(max(np.float32(acc) * mult, lo), hi)
    r = (v + ROUNDING_MAGIC) - ROUNDING_MAGIC
    return np.int32(r) + y_zp


@njit(**JIT)
def requantize_array(acc, mult, y_zp, qmin, qmax, out):
    """Requantize int32 acc[m, n] with per-column multipliers into out (same shape)."""
    lo = np.float32(qmin - y_zp)
    hi = np.float32(qmax - y_zp)
    zp = np.int32(y_zp)
    for m in range(acc.shape[0]):
        for n in range(acc.shape[1]):
            out[m, n] = requantize_value(acc[m, n], mult[n], zp, lo, hi)


@njit(inline="always", **JIT)
def requantize_byte(acc, mult, zp_f, lo, hi):
    """`requantize_value` as the output byte (uint8 bits; int8 outputs view them), with
    the zero point `zp_f` (float32) added before the conversion: r + zp is exact in
    float32 (|r + zp| <= 255), so this equals requantize_value, while every step stays
    32 bits wide (numba widens int32 + int32 to int64, which halves the vector width).
    """
    v = min(max(np.float32(acc) * mult, lo), hi)
    r = ((v + ROUNDING_MAGIC) - ROUNDING_MAGIC) + zp_f
    return np.uint8(np.int32(r))


#: float32 bit pattern of ROUNDING_MAGIC.
_MAGIC_BITS = 0x4B400000


def requantize_ir(builder: ir.IRBuilder, acc, mult, lo, hi, zp):
    """IR form of `requantize_value` on int32 vectors: rint(clamp(float32(acc) * mult)) + zp.

    `mult`, `lo`, `hi` are float32 vectors (lo/hi = float32(qmin - zp, qmax - zp)), `zp`
    an int32 vector; returns int32 (callers truncate to the byte). The clamps are numba's
    max/min (select(lo > v, lo, v), select(hi < v, hi, v)). The rounding is the same
    `v + M` (M = 1.5 * 2^23, round half to even) as the scalar form; for |v| <= 510 the
    sum lies in [2^23, 2^24) where float32 spacing is 1, so its bit pattern is
    bits(M) + rint(v), and bits(v + M) - (bits(M) - zp) = rint(v) + zp: one integer
    subtract in place of subtracting M, adding zp and converting (all exact there).
    """
    vec = acc.type
    v = _clamped_product(builder, acc, mult, lo, hi)
    magic = ir.Constant(mult.type, [float(ROUNDING_MAGIC)] * mult.type.count)
    zbits = builder.sub(ir.Constant(vec, [_MAGIC_BITS] * vec.count), zp)
    return builder.sub(builder.bitcast(builder.fadd(v, magic), vec), zbits)


def requantize_float_ir(builder: ir.IRBuilder, acc, mult, lo, hi, zp):
    """`requantize_ir`'s value as float32 (exactly: a small integer); `zp` is a float32
    vector. v + M is M + rint(v) exactly (see above), and M - zp is exact too, so their
    difference rint(v) + zp is exact: one subtract where the integer form would need a
    subtract and an int -> float conversion."""
    v = _clamped_product(builder, acc, mult, lo, hi)
    magic = ir.Constant(mult.type, [float(ROUNDING_MAGIC)] * mult.type.count)
    return builder.fsub(builder.fadd(v, magic), builder.fsub(magic, zp))


def _clamped_product(builder: ir.IRBuilder, acc, mult, lo, hi):
    """min(max(float32(acc) * mult, lo), hi) as numba's max/min selects."""
    v = builder.fmul(builder.sitofp(acc, mult.type), mult)
    v = builder.select(builder.fcmp_ordered(">", lo, v), lo, v)
    return builder.select(builder.fcmp_ordered("<", hi, v), hi, v)

# ----------------------------------------------------------------- second stage: add


@dataclass(frozen=True)
class ColumnAdd:
    """QLinearAdd of a constant per-column vector to a requantized output q (8-bit):
    ``y = saturate(rint((float32(q) * scale + offset) + term[n]))`` in float32.

    MLAS's qladd computes ``a*r_a + (b*r_b + fixed)``; with the constant's part
    precomputed per column this is the same float32 operations on the same values
    (see `column_add`), so the fused result has the same bits as the separate op.
    """

    scale: np.float32
    offset: np.float32
    term: np.ndarray  # float32 [N]
    out_dtype: np.dtype

    @property
    def params(self) -> np.ndarray:
        """float32 [scale, offset, lo, hi] (lo/hi: the output type's range)."""
        info = np.iinfo(self.out_dtype)
        return np.array([self.scale, self.offset, info.min, info.max], np.float32)

    def key(self) -> tuple:
        """Hashable identity (launch memo keys)."""
        return (float(self.scale), np.float32(self.offset).tobytes(), self.term.tobytes(),
                np.dtype(self.out_dtype).str)


def column_add(
    r_a: np.float32, r_b: np.float32, fixed: np.float32, const: np.ndarray, const_is_a: bool,
    n: int, out_dtype: np.dtype,
) -> ColumnAdd | None:
    """The `ColumnAdd` of QLinearAdd(q, const) (or (const, q) when `const_is_a`) with the
    op's float32 parameters (r_a, r_b, fixed); `const` is one value or N, any 8-bit type.

    q first: ``q*r_a + (c*r_b + fixed)``: term = c*r_b + fixed, offset = -0.0 (x + -0.0
    is x, bit for bit). q second: ``c*r_a + (q*r_b + fixed)``, and float addition is
    commutative: term = c*r_a, offset = fixed. None when a parameter is not finite (NaN
    propagation is not reproduced by the vector rounding).
    """
    c = np.broadcast_to(np.asarray(const).reshape(-1).astype(np.float32), (n,))
    r_a, r_b, fixed = np.float32(r_a), np.float32(r_b), np.float32(fixed)
    if const_is_a:
        scale, offset, term = r_b, fixed, c * r_a
    else:
        scale, offset, term = r_a, np.float32(-0.0), c * r_b + fixed
    term = np.ascontiguousarray(term, np.float32)
    if not (np.isfinite(scale) and np.isfinite(offset) and np.isfinite(term).all()):
        return None
    return ColumnAdd(scale, offset, term, np.dtype(out_dtype))


@njit(inline="always", **JIT)
def requantize_add(q, scale, offset, term, lo, hi):
    """`ColumnAdd` of one value: saturate(rint((float32(q) * scale + offset) + term)), the
    clamps and rounding as written in qelementwise's QLinearAdd (lo/hi: output range)."""
    y = (np.float32(q) * scale + offset) + term
    if y < lo:
        y = lo
    if y > hi:
        y = hi
    return np.int32((y + ROUNDING_MAGIC) - ROUNDING_MAGIC)


def requantize_add_ir(builder: ir.IRBuilder, q, scale, offset, term, lo, hi):
    """IR form of `requantize_add` on float32 vectors (q: the first stage's values, as
    `requantize_float_ir` gives them); returns int32. The clamps are selects (the same
    as the ifs for any non-NaN y; `column_add` keeps y finite) and the rounding is the
    magic-number add read as bits (see `requantize_ir`: |y| <= 255 here)."""
    vec = ir.VectorType(ir.IntType(32), q.type.count)
    y = builder.fadd(builder.fadd(builder.fmul(q, scale), offset), term)
    y = builder.select(builder.fcmp_ordered("<", y, lo), lo, y)
    y = builder.select(builder.fcmp_ordered(">", y, hi), hi, y)
    magic = ir.Constant(q.type, [float(ROUNDING_MAGIC)] * q.type.count)
    bits = ir.Constant(vec, [_MAGIC_BITS] * vec.count)
    return builder.sub(builder.bitcast(builder.fadd(y, magic), vec), bits)
