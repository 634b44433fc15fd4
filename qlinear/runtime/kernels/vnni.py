"""The VNNI micro-kernels: MR rows x (16, 32, 48 or 64) columns of int32, uint8 x int8
dot products, with the epilogue fused in.

numba's LLVM never emits `vpdpbusd` from plain loops, so the register-blocked tile is
written as LLVM IR in a numba ``@intrinsic``: MR x V accumulators of ``<16 x i32>``
(V = 1..4 vectors per row) live in zmm registers for the whole reduction, each step
broadcasts 4 activation bytes per row and multiplies them with the 4 x 16V packed
weight bytes. Full 64-column panels run 6 x 64 tiles (or 1..5 rows for a short
remainder); a panel with <= 48 real columns (N = 16, 24, 32, the last panel of N = 96,
144, 160 ...) runs a narrow tile with more rows (vnni.NARROW_ROWS: 12 x 16, 6 x 32,
8 x 48), so no dot product is spent on padding columns. Each kernel is its own LLVM
function (internal, noinline) that loops over the tiles of rows [m_begin, m_end): its
registers are allocated apart from the driver's, and the per-tile overhead is a few
scalar ops.

Layouts (all byte offsets):
  * activations ``a`` (uint8, flat): row m starts at ``row_off[m] + a_base``; the
    reduction walks ``for t in taps: for q in range(c4): a[start + taps[t] + a_step*q : +4]``
    (a GEMM is one tap at 0 over A packed per call as [tile][K/4][6][4], a_step = 24;
    an implicit-GEMM convolution has one tap per kernel position over a padded NHWC
    buffer and a_step = 4). The last tile of a range repeats its last real row in the
    rows past the end (computing and storing the same values twice).
  * weights ``b`` (int8, flat) from ``b_off``: [T*c4][64][4], i.e. per reduction step
    the 64 columns' 4 bytes, contiguous (256 bytes); a V-vector tile reads the first
    64V bytes of each step.

Epilogue (``emode``), straight from the registers. Column parameters are read at
``p0`` of their arrays, 16V entries (the driver copies them to scratch padded to whole
panels); row m is stored at element ``out_row_off[m] + o_col0`` of the output, ``ncols``
columns (k-masked stores).
  * -1: the raw int32 tile to ``tile`` [MR][64] (strided outputs: the numba epilogue
    does the rest);
  *  0: int32  ``acc + col - bzp*rowsum`` (the accumulators start at ``col``);
  *  1: 8-bit  ``requant.requantize_byte(acc + col - bzp*rowsum, mult, zp, lo, hi)``:
    the same float32 multiply, clamps (as numba's max/min select) and round-half-even
    magic add, then the exact integer steps done on the bits (see `_round_to_byte`):
    bit-identical;
  *  2: float32 ``float32(acc + col - bzp*rowsum) * fscale + fbias`` (no FMA contraction).
  *  3: mode 1's value q, then ``requant.requantize_add(q, scale, offset, fbias, lo2,
    hi2)`` (a per-column QLinearAdd: the per-column term rides in ``fbias``, the scalars
    in ``qf[3:7]``), stored as the byte: the int8 tile is written once.
  The row-sum correction runs when ``use_rowsum`` (``rowsum[rs0 + m]``).

If the host lacks AVX512-VNNI (see config.host_has_vnni) the same intrinsic emits a
generic widening multiply-add instead of `vpdpbusd`, because asking LLVM for the
instruction there aborts the process. Callers still select the portable kernel on such
hosts; the fallback only makes compiling the shared driver safe everywhere.

Caching: the drivers that inline these kernels (gemm.py) are cached by numba, keyed on
their own source file's content only. After editing this file, clear the cache
(``qlinear/runtime/kernels/__pycache__/gemm.*.nb[ic]``) or stale kernels keep running.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from qlinear.runtime.kernels.config import host_has_vnni
from qlinear.runtime.kernels.requant import (
    requantize_add_ir,
    requantize_float_ir,
    requantize_ir,
)

#: Register block of full panels: rows per tile (MR) and columns per tile (NR = 4 zmm).
MAX_ROWS = 6
TILE_COLS = 64
STEP_BYTES = TILE_COLS * 4  # packed weight bytes per reduction step
#: Rows of the narrow tiles, by zmm vectors per row (measured: 12 x 16 beats 10, 14 and
#: 16 rows; 12 x 32 spilled accumulators in the loop, 6 x 32 beats 8 and 10 rows).
NARROW_ROWS = (0, 12, 6, 8)
#: Largest tile height of any kernel (size of the raw tile buffer, rows of 64 int32).
TILE_ROWS = max(MAX_ROWS, *NARROW_ROWS)

_I1 = ir.IntType(1)
_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()
_V16 = ir.VectorType(_I32, 16)
_V16F = ir.VectorType(_F32, 16)
_V16B = ir.VectorType(_I8, 16)
_V16M = ir.VectorType(_I1, 16)


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


def _splat(builder: ir.IRBuilder, value, vty):
    one = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined), ir.Constant(_V16, [0] * 16))


def _opaque(builder: ir.IRBuilder, value):
    """`value`, hidden from LLVM's loop optimizations by an empty asm (one register move).

    With 12 tile rows, loop strength reduction turns every row's address into its own
    induction variable; there are not enough registers, so each step did a
    read-modify-write of 12 spilled pointers. Made opaque inside the loop, a row's base
    stays invariant: at worst one plain reload per row and step.
    """
    fnty = ir.FunctionType(_I64, [_I64])
    return builder.asm(fnty, "", "=r,0", [value], side_effect=True)


def _masked_store(builder: ir.IRBuilder, value, ptr, mask):
    """llvm.masked.store (a k-masked vmovdqu8/32 on AVX-512): lanes off the mask untouched."""
    vty = value.type
    name = {_V16B: "v16i8", _V16: "v16i32", _V16F: "v16f32"}[vty]
    p = builder.bitcast(ptr, vty.as_pointer())
    fnty = ir.FunctionType(ir.VoidType(), [vty, p.type, _I32, _V16M])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.masked.store.{name}.p0")
    builder.call(fn, [value, p, ir.Constant(_I32, 1), mask])


def _load_vec(builder: ir.IRBuilder, base, index, vty):
    """Unaligned <16 x T> load of base[index : index + 16]."""
    p = builder.gep(base, [index])
    return builder.load(builder.bitcast(p, vty.as_pointer()), align=4)


#: The kernels' arguments: (name, kind); arrays are passed as data pointers of that
#: LLVM element type, "i64" values as int64, "i1" as a boolean.
_ARGS = (
    ("a", _I8), ("row_off", _I64), ("m_begin", "i64"), ("m_end", "i64"), ("a_base", "i64"),
    ("taps", _I64), ("c4", "i64"), ("a_step", "i64"), ("b", _I8), ("b_off", "i64"),
    ("tile", _I32), ("emode", "i64"), ("ncols", "i64"), ("col", _I32), ("bzp", _I32),
    ("p0", "i64"), ("rowsum", _I32), ("rs0", "i64"), ("use_rowsum", "i1"),
    ("out_row_off", _I64), ("o_col0", "i64"), ("out_i32", _I32), ("out_q", _I8),
    ("out_f", _F32), ("mult", _F32), ("fscale", _F32), ("fbias", _F32), ("qf", _F32),
)
_ARG_INDEX = {name: i for i, (name, _) in enumerate(_ARGS)}
_SCALAR_TYPES = {"i64": _I64, "i1": _I1}
#: numpy dtypes of the array arguments (1-D, C-contiguous): checked at typing time.
_ARRAY_DTYPES = {
    "a": types.uint8, "row_off": types.int64, "taps": types.int64, "b": types.int8,
    "tile": types.int32, "col": types.int32, "bzp": types.int32, "rowsum": types.int32,
    "out_row_off": types.int64, "out_i32": types.int32, "out_q": types.uint8,
    "out_f": types.float32, "mult": types.float32, "fscale": types.float32,
    "fbias": types.float32, "qf": types.float32,
}


def _check_types(arg_types) -> None:
    for (name, kind), ty in zip(_ARGS, arg_types, strict=True):
        if isinstance(kind, str):
            ok = isinstance(ty, types.Boolean if kind == "i1" else types.Integer)
        else:
            ok = (isinstance(ty, types.Array) and ty.ndim == 1 and ty.layout == "C"
                  and ty.dtype == _ARRAY_DTYPES[name])
        if not ok:
            raise TypingError(f"VNNI tile kernel: bad argument {name}: {ty}")


def _llvm_params():
    params = []
    for name, kind in _ARGS:
        params.append(_SCALAR_TYPES[kind] if isinstance(kind, str) else kind.as_pointer())
        if name == "taps":
            params.append(_I64)  # its length
    return params


def _make_tile_kernel(rows: int, nvec: int = 4):
    """The numba intrinsic running `rows` x 16*`nvec` tiles over rows [m_begin, m_end).

    The body is its own LLVM function (internal, noinline) in the caller's module, so
    its registers are allocated apart from the driver's: inlined into the ~30-variable
    driver loop, LLVM spilled the tile's row pointers and accumulator parameters.
    """
    width = 16 * nvec
    fname = f"qlinear_vnni_tile_{rows}x{width}_{'vnni' if host_has_vnni() else 'generic'}"

    @intrinsic
    def tile_kernel(
        typingctx, a, row_off, m_begin, m_end, a_base, taps, c4, a_step, b, b_off, tile,
        emode, ncols, col, bzp, p0, rowsum, rs0, use_rowsum, out_row_off, o_col0, out_i32,
        out_q, out_f, mult, fscale, fbias, qf,
    ):
        sig = types.void(
            a, row_off, m_begin, m_end, a_base, taps, c4, a_step, b, b_off, tile, emode,
            ncols, col, bzp, p0, rowsum, rs0, use_rowsum, out_row_off, o_col0, out_i32,
            out_q, out_f, mult, fscale, fbias, qf,
        )
        _check_types(sig.args)

        def codegen(context, builder, signature, args):
            module = builder.module
            fn = module.globals.get(fname)
            if fn is None:
                fn = ir.Function(module, ir.FunctionType(ir.VoidType(), _llvm_params()), fname)
                fn.linkage = "internal"
                fn.attributes.add("noinline")
                _build_tile_function(fn, rows, nvec)
            values = []
            for (name, kind), ty, val in zip(_ARGS, signature.args, args, strict=True):
                if isinstance(kind, str):
                    target = types.boolean if kind == "i1" else types.int64
                    values.append(context.cast(builder, val, ty, target))
                    continue
                ary = context.make_array(ty)(context, builder, val)
                values.append(builder.bitcast(ary.data, kind.as_pointer()))
                if name == "taps":
                    values.append(builder.extract_value(ary.shape, 0))
            builder.call(fn, values)
            return context.get_dummy_value()

        return sig, codegen

    tile_kernel.__name__ = f"vnni_tile_{rows}x{width}"
    return tile_kernel


def _build_tile_function(fn: ir.Function, rows: int, nvec: int) -> None:
    dpbusd = _dpbusd_native if host_has_vnni() else _dpbusd_generic
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    arg_list = list(fn.args)
    n_taps = arg_list.pop(_ARG_INDEX["taps"] + 1)
    arg = dict(zip((name for name, _ in _ARGS), arg_list, strict=True))
    arg["n_taps"] = n_taps
    zero = ir.Constant(_V16, [0] * 16)
    accs = [cgutils.alloca_once_value(builder, zero) for _ in range(rows * nvec)]
    b_cur = cgutils.alloca_once_value(builder, arg["b_off"])
    a_addr = builder.ptrtoint(arg["a"], _I64)
    m_begin, m_end = arg["m_begin"], arg["m_end"]
    one = ir.Constant(_I64, 1)
    rows_c = ir.Constant(_I64, rows)
    n_tiles = builder.sdiv(builder.add(builder.sub(m_end, m_begin), ir.Constant(_I64, rows - 1)),
                           rows_c)
    with cgutils.for_range(builder, n_tiles) as tile_loop:
        m0 = builder.add(m_begin, builder.mul(tile_loop.index, rows_c))
        nrows = builder.sub(m_end, m0)
        # tile row r reads row m0 + min(r, nrows - 1): rows past the end repeat the last
        last = builder.sub(nrows, one)
        row_idx = [m0]
        for r in range(1, rows):
            rc = ir.Constant(_I64, r)
            inside = builder.icmp_signed("<", rc, nrows)
            row_idx.append(builder.add(m0, builder.select(inside, rc, last)))
        rows_addr = [
            builder.add(
                builder.add(builder.load(builder.gep(arg["row_off"], [row_idx[r]])),
                            arg["a_base"]),
                a_addr,
            )
            for r in range(rows)
        ]
        # fused modes start the accumulators at the column term (int32 adds wrap, so
        # the order does not matter); the raw tile starts at 0 (the numba epilogue adds it)
        emode = arg["emode"]
        raw = builder.icmp_signed("<", emode, ir.Constant(_I64, 0))
        for j in range(nvec):
            idx = builder.add(arg["p0"], ir.Constant(_I64, 16 * j))
            init = builder.select(raw, zero, _load_vec(builder, arg["col"], idx, _V16))
            for r in range(rows):
                builder.store(init, accs[r * nvec + j])
        builder.store(arg["b_off"], b_cur)
        with cgutils.for_range(builder, n_taps) as tap_loop:
            tap = builder.load(builder.gep(arg["taps"], [tap_loop.index]))
            with cgutils.for_range(builder, arg["c4"]) as k_loop:
                k_off = builder.add(tap, builder.mul(k_loop.index, arg["a_step"]))
                boff = builder.load(b_cur)
                bvecs = []
                for j in range(nvec):
                    p = builder.gep(arg["b"], [builder.add(boff, ir.Constant(_I64, 64 * j))])
                    bvecs.append(builder.load(builder.bitcast(p, _V16.as_pointer()), align=1))
                for r in range(rows):
                    base = _opaque(builder, rows_addr[r])
                    p = builder.inttoptr(builder.add(base, k_off), _I32.as_pointer())
                    splat = _splat(builder, builder.load(p, align=1), _V16)
                    for j in range(nvec):
                        slot = accs[r * nvec + j]
                        builder.store(dpbusd(builder, builder.load(slot), splat, bvecs[j]), slot)
                builder.store(builder.add(boff, ir.Constant(_I64, STEP_BYTES)), b_cur)

        with builder.if_else(raw) as (then_raw, otherwise):
            with then_raw:
                for r in range(rows):
                    for j in range(nvec):
                        p = builder.gep(arg["tile"], [ir.Constant(_I64, r * 64 + j * 16)])
                        builder.store(builder.load(accs[r * nvec + j]),
                                      builder.bitcast(p, _V16.as_pointer()), align=4)
            with otherwise:
                _fused_epilogue(builder, arg, accs, rows, nvec, emode, row_idx)
    builder.ret_void()


def _fused_epilogue(builder, arg, accs, rows, nvec, emode, row_idx):
    """Epilogue modes 0/1/2/3 (see the module doc) from the accumulators.

    Column-major order: one vector column of parameters (2..3 zmm) is live at a time
    next to the accumulators, loaded after the previous column's stores (which may
    alias them). Hoisting all of them (8..12 zmm next to 24 accumulators) made LLVM
    spill, and 64-byte reloads right after the spill stalled on store forwarding.
    """
    p0 = arg["p0"]
    lanes = ir.Constant(ir.VectorType(_I64, 16), list(range(16)))
    ncols_v = _splat(builder, arg["ncols"], ir.VectorType(_I64, 16))
    masks = []
    for j in range(nvec):
        idx = builder.add(lanes, ir.Constant(ir.VectorType(_I64, 16), [16 * j] * 16))
        masks.append(builder.icmp_unsigned("<", idx, ncols_v))

    def param(name, j, vty):
        return _load_vec(builder, arg[name], builder.add(p0, ir.Constant(_I64, 16 * j)), vty)

    # row-sum correction, in place on the accumulators: acc -= bzp[n] * rowsum[r]
    with builder.if_then(arg["use_rowsum"], likely=False):
        bz = [param("bzp", j, _V16) for j in range(nvec)]
        for r in range(rows):
            idx = builder.add(arg["rs0"], row_idx[r])
            rs_v = _splat(builder, builder.load(builder.gep(arg["rowsum"], [idx])), _V16)
            for j in range(nvec):
                slot = accs[r * nvec + j]
                builder.store(builder.sub(builder.load(slot), builder.mul(bz[j], rs_v)), slot)

    out_offs = [
        builder.add(builder.load(builder.gep(arg["out_row_off"], [row_idx[r]])), arg["o_col0"])
        for r in range(rows)
    ]

    def out_ptr(base, r, j):
        return builder.gep(base, [builder.add(out_offs[r], ir.Constant(_I64, 16 * j))])

    def qparam(i):
        return _splat(builder, builder.load(builder.gep(arg["qf"], [ir.Constant(_I64, i)])),
                      _V16F)

    def store_bytes(add: bool) -> None:
        """Modes 1 (add=False) and 3: requantize (then add), store the bytes."""
        out_q = arg["out_q"]
        for j in range(nvec):
            mult = param("mult", j, _V16F)
            lo_v, hi_v, zp_f = qparam(1), qparam(2), qparam(0)
            zp_v = builder.fptosi(zp_f, _V16)
            if add:
                term = param("fbias", j, _V16F)
                scale, offset, lo2, hi2 = (qparam(i) for i in (3, 4, 5, 6))
            for r in range(rows):
                acc = builder.load(accs[r * nvec + j])
                if add:
                    q1 = requantize_float_ir(builder, acc, mult, lo_v, hi_v, zp_f)
                    q = requantize_add_ir(builder, q1, scale, offset, term, lo2, hi2)
                else:
                    q = requantize_ir(builder, acc, mult, lo_v, hi_v, zp_v)
                _masked_store(builder, builder.trunc(q, _V16B), out_ptr(out_q, r, j), masks[j])

    def store_wide() -> None:
        """Modes 0 (int32) and 2 (float32)."""
        is_i = builder.icmp_signed("==", emode, ir.Constant(_I64, 0))
        with builder.if_else(is_i) as (then_i, then_f):
            with then_i:
                out_i = arg["out_i32"]
                for j in range(nvec):
                    for r in range(rows):
                        acc = builder.load(accs[r * nvec + j])
                        _masked_store(builder, acc, out_ptr(out_i, r, j), masks[j])
            with then_f:
                out_f = arg["out_f"]
                for j in range(nvec):
                    fs, fb = param("fscale", j, _V16F), param("fbias", j, _V16F)
                    for r in range(rows):
                        acc = builder.load(accs[r * nvec + j])
                        v = builder.fadd(builder.fmul(builder.sitofp(acc, _V16F), fs), fb)
                        _masked_store(builder, v, out_ptr(out_f, r, j), masks[j])

    is_q = builder.icmp_signed("==", emode, ir.Constant(_I64, 1))
    is_qa = builder.icmp_signed("==", emode, ir.Constant(_I64, 3))
    with builder.if_else(is_q, likely=True) as (then_q, other):
        with then_q:
            store_bytes(add=False)
        with other, builder.if_else(is_qa) as (then_qa, wide):
            with then_qa:
                store_bytes(add=True)
            with wide:
                store_wide()


#: Full 64-column panels: 1..6 rows (the row remainder of a block runs exact).
vnni_tile_1x64 = _make_tile_kernel(1)
vnni_tile_2x64 = _make_tile_kernel(2)
vnni_tile_3x64 = _make_tile_kernel(3)
vnni_tile_4x64 = _make_tile_kernel(4)
vnni_tile_5x64 = _make_tile_kernel(5)
vnni_tile_6x64 = _make_tile_kernel(6)
#: Narrow panels (<= 16, 32, 48 real columns).
vnni_tile_12x16 = _make_tile_kernel(NARROW_ROWS[1], 1)
vnni_tile_6x32 = _make_tile_kernel(NARROW_ROWS[2], 2)
vnni_tile_8x48 = _make_tile_kernel(NARROW_ROWS[3], 3)
