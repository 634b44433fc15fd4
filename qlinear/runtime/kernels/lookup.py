"""Byte table lookup: out[i] = table[x[i]] for uint8 x and a 256-entry 8-bit table.

The optimizer folds chains of 8-bit elementwise ops (a quantized GELU, a scale before
softmax) into such a table, so in BERT this pass runs over every [128, 3072] FFN
activation. A scalar loop does one byte per cycle; LLVM does not vectorize it (a byte
gather). With AVX512-VBMI, `vpermi2b` looks up 64 bytes at once in a 128-byte table
held in two zmm registers (by the low 7 bits of each index): two of them (table bytes
0..127 and 128..255) and a select on bit 7 of the index give 64 lookups in ~5
instructions; the loop then runs at the L2 bandwidth (~4 cycles per 64 bytes on this
Zen 4), 12x the scalar loop.

numba never emits vpermi2b, so the loop is LLVM IR in an ``@intrinsic`` (like vnni.py),
compiled only when `config.use_vbmi()` says the CPU has it: LLVM aborts the process if
asked for an instruction the CPU lacks. Elsewhere, or with ``QLINEAR_KERNELS=portable``,
the plain numba loop runs. Both paths split the bytes into tasks for
`parallel.run_tasks`.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from qlinear.runtime.kernels import config
from qlinear.runtime.kernels.config import JIT
from qlinear.runtime.kernels.parallel import claim, finish, run_tasks

#: Bytes per claimed task. The VBMI loop is bound by L2 bandwidth (~4 cycles per 64
#: bytes: reading x and the output lines), not by vpermi2b, and with two threads by
#: lines moving between the cores: 64 KiB tasks beat 32 KiB (6.6 vs 7.1 us over
#: 384 KiB) and 16 KiB (7.7 us). The scalar loop (~1 byte per cycle) balances better
#: with smaller tasks.
VBMI_CHUNK = 1 << 16
PORTABLE_CHUNK = 1 << 14
#: run_tasks' work units (multiply-add equivalents) per byte: SERIAL_WORK (2^21) / 12
#: ~ 170 KB. Measured with VBMI on 1 vs 2 threads (32 KiB tasks): 64 KiB 2.5 vs 3.0
#: us, 128 KiB 4.9 vs 4.6 us, 192 KiB 5.4 vs 4.4 us, 384 KiB 9.8 vs 6.1 us; when another
#: process keeps the second core busy, two threads cost 1-5 us more instead. The scalar
#: loop pays from 64 KiB (21.5 vs 12.4 us); 64 units put its threshold at 32 KiB.
VBMI_BYTE_WORK = 12
PORTABLE_BYTE_WORK = 64

_I1 = ir.IntType(1)
_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V64B = ir.VectorType(_I8, 64)
_V64M = ir.VectorType(_I1, 64)


def _call(builder: ir.IRBuilder, name: str, restype, args):
    fnty = ir.FunctionType(restype, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


def _lookup64(builder: ir.IRBuilder, tables, idx):
    """64 lookups: vpermi2b in each table half (low 7 index bits), bit 7 picks the half."""
    name = "llvm.x86.avx512.vpermi2var.qi.512"
    lo = _call(builder, name, _V64B, [tables[0], idx, tables[1]])
    hi = _call(builder, name, _V64B, [tables[2], idx, tables[3]])
    upper = builder.icmp_signed("<", idx, ir.Constant(_V64B, None))  # vpmovb2m
    return builder.select(upper, hi, lo)


def _vec_ptr(builder: ir.IRBuilder, base, offset):
    return builder.bitcast(builder.gep(base, [offset]), _V64B.as_pointer())


def _build_vbmi_range(fn: ir.Function) -> None:
    """void f(i8* x, i8* table, i8* out, i64 start, i64 stop): whole 64-byte vectors,
    then one k-masked vector for the tail (no byte outside [start, stop) is touched)."""
    x, table, out, start, stop = fn.args
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    tables = [builder.load(_vec_ptr(builder, table, ir.Constant(_I64, 64 * k)), align=1)
              for k in range(4)]
    n = builder.sub(stop, start)
    full = builder.ashr(n, ir.Constant(_I64, 6))
    with cgutils.for_range(builder, full) as loop:
        off = builder.add(start, builder.shl(loop.index, ir.Constant(_I64, 6)))
        idx = builder.load(_vec_ptr(builder, x, off), align=1)
        builder.store(_lookup64(builder, tables, idx), _vec_ptr(builder, out, off), align=1)
    rem = builder.and_(n, ir.Constant(_I64, 63))
    with builder.if_then(builder.icmp_signed("!=", rem, ir.Constant(_I64, 0))):
        off = builder.sub(stop, rem)
        bits = builder.sub(builder.shl(ir.Constant(_I64, 1), rem), ir.Constant(_I64, 1))
        mask = builder.bitcast(bits, _V64M)
        align = ir.Constant(_I32, 1)
        idx = _call(builder, "llvm.masked.load.v64i8.p0", _V64B,
                    [_vec_ptr(builder, x, off), align, mask, ir.Constant(_V64B, None)])
        _call(builder, "llvm.masked.store.v64i8.p0", ir.VoidType(),
              [_lookup64(builder, tables, idx), _vec_ptr(builder, out, off), align, mask])
    builder.ret_void()


def _is_bytes(ty, dtypes=(types.uint8, types.int8)) -> bool:
    return (isinstance(ty, types.Array) and ty.ndim == 1 and ty.layout == "C"
            and ty.dtype in dtypes)


@intrinsic
def _vbmi_range(typingctx, x, table, out, start, stop):
    """out[start:stop] = table[x[start:stop]] with vpermi2b (table: >= 256 bytes).

    Refuses to compile on a CPU without AVX512-VBMI (instead of LLVM aborting)."""
    if not config.host_has_vbmi():
        raise TypingError("the VBMI lookup kernel needs a CPU with AVX512-VBMI")
    if not (_is_bytes(x, (types.uint8,)) and _is_bytes(table) and _is_bytes(out)
            and isinstance(start, types.Integer) and isinstance(stop, types.Integer)):
        raise TypingError(f"VBMI lookup: bad arguments {x}, {table}, {out}, {start}, {stop}")
    sig = types.void(x, table, out, start, stop)

    def codegen(context, builder, signature, args):
        module = builder.module
        fn = module.globals.get("qlinear_lookup_vbmi")
        if fn is None:
            ptr = _I8.as_pointer()
            fnty = ir.FunctionType(ir.VoidType(), [ptr, ptr, ptr, _I64, _I64])
            fn = ir.Function(module, fnty, "qlinear_lookup_vbmi")
            fn.linkage = "internal"
            _build_vbmi_range(fn)
        values = [builder.bitcast(context.make_array(ty)(context, builder, val).data,
                                  _I8.as_pointer())
                  for ty, val in zip(signature.args[:3], args[:3], strict=True)]
        values += [context.cast(builder, v, ty, types.int64)
                   for ty, v in zip(signature.args[3:], args[3:], strict=True)]
        builder.call(fn, values)
        return context.get_dummy_value()

    return sig, codegen


@njit(**JIT)
def _lookup_vbmi(counters, x, table, out, chunk, ntasks):  # pragma: no cover
    n = x.size
    while True:
        t = claim(counters)
        if t >= ntasks:
            break
        start = t * chunk
        _vbmi_range(x, table, out, start, min(n, start + chunk))
        finish(counters)


@njit(**JIT)
def _lookup_portable(counters, x, table, out, chunk, ntasks):  # pragma: no cover
    n = x.size
    while True:
        t = claim(counters)
        if t >= ntasks:
            break
        # unsigned indices: no negative-index wraparound code in the loop (2x faster)
        for i in range(np.uint64(t * chunk), np.uint64(min(n, (t + 1) * chunk))):
            out[i] = table[x[i]]
        finish(counters)


def lookup_bytes(x: np.ndarray, table: np.ndarray, out: np.ndarray,
                 vbmi: bool | None = None, chunk: int | None = None) -> None:
    """out[i] = table[x[i]]: x 1-D contiguous uint8, table (>= 256 entries) and out 1-D
    contiguous, both uint8 or both int8. `vbmi` None: as config.use_vbmi() says;
    `chunk` (bytes per task) None: the path's default (tests pass small ones)."""
    n = x.size
    if table.size < 256 or out.size != n:
        raise ValueError(f"lookup_bytes: table of {table.size} (< 256) or {out.size} != {n}")
    if n == 0:
        return
    if config.use_vbmi() if vbmi is None else vbmi:
        chunk = chunk or VBMI_CHUNK
        ntasks = -(-n // chunk)
        run_tasks(_lookup_vbmi, ntasks, n * VBMI_BYTE_WORK, x, table, out, chunk, ntasks)
    else:
        chunk = chunk or PORTABLE_CHUNK
        ntasks = -(-n // chunk)
        run_tasks(_lookup_portable, ntasks, n * PORTABLE_BYTE_WORK, x, table, out, chunk,
                  ntasks)
