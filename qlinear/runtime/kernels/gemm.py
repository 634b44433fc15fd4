"""int8 GEMM: weight packing, the tiled parallel driver and its epilogues.

All integer products are uint8 x int8 (what `vpdpbusd` multiplies). Other type pairs
are shifted into that domain exactly, and the shift is folded into the zero points:
int8 activations a' = a + 128 (a_zp' = a_zp + 128), uint8 weights b' = b - 128
(b_zp' = b_zp - 128). Then, per design §2, with the real reduction length K,

    acc[m, n] = sum_k a'[m,k] b'[k,n] - a_zp' colsum[n] - b_zp'[n] rowsum[m] + K a_zp' b_zp'[n]

`colsum` is computed when weights are packed; the `a_zp'` terms and an optional int32
bias are folded into one per-column term per call; `rowsum` is only computed when
some `b_zp'` is nonzero.

One driver serves GEMM and implicit-GEMM convolution: each output row m reads its
activations at byte offset `row_off[m]` (+ a per-tap offset) of a flat uint8 buffer.
The epilogue writes int32, requantized 8-bit, or float32 output straight from the
register tile (no int32 tensor is materialised for the last two); the 8-bit output can
also go through a per-column QLinearAdd (`requant.ColumnAdd`) before it is stored.

Per-call cost: everything but the data (offsets, column terms, multipliers, the ~30
driver arguments) lives in a `PackedLaunch`, built once per shape and memoized on the
packed weights, so a call is one numba launch (plus A packing for plain GEMMs).
Batched products ([G, M, K] x [G, K, N]: attention, constant batched weights) run the
G entries as the driver's groups in one launch; activation B is packed per call by
`pack_batched` (word copies from B transposed, column terms included).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from qlinear.runtime.kernels import config
from qlinear.runtime.kernels.config import JIT
from qlinear.runtime.kernels.parallel import claim, finish, run_tasks, unrecorded
from qlinear.runtime.kernels.program import Replayed
from qlinear.runtime.kernels.requant import (
    OUT_FLOAT,
    OUT_INT32,
    OUT_QUANTIZED,
    OUT_QUANTIZED_ADD,
    ColumnAdd,
    requantize_add,
    requantize_byte,
    requantize_value,
)
from qlinear.runtime.kernels.vnni import (
    MAX_ROWS,
    NARROW_ROWS,
    TILE_COLS,
    TILE_ROWS,
    vnni_tile_1x64,
    vnni_tile_2x64,
    vnni_tile_3x64,
    vnni_tile_4x64,
    vnni_tile_5x64,
    vnni_tile_6x32,
    vnni_tile_6x64,
    vnni_tile_8x48,
    vnni_tile_12x16,
)

ACT_SHIFT = {np.dtype(np.uint8): 0, np.dtype(np.int8): 128}
_U = np.uint64  # unsigned indices: no negative-index fix-ups, straight-line vector code


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclass(frozen=True)
class PackedWeights:
    """Weights in the micro-kernel layout [G][panel][T*c4][64][4] (int8), with column sums.

    `zero_point` and `colsum` are per output column (G*cols entries) in the int8
    domain the kernel multiplies (uint8 weights shifted by -128). `k` is the real
    reduction length per group (taps * channels), never the padded one.
    """

    data: np.ndarray
    colsum: np.ndarray
    zero_point: np.ndarray
    k: int
    taps: int
    c4: int
    groups: int
    cols: int
    panels: int
    has_zero_point: bool = False
    #: per-call values that only depend on shapes / zero points, memoized (small)
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def step_bytes(self) -> int:
        """Packed bytes of one 64-column panel."""
        return self.taps * self.c4 * TILE_COLS * 4

    def column_term(self, a_zp: int, bias: np.ndarray | None) -> np.ndarray:
        """int32 [G*cols]: bias - a_zp*colsum + K*a_zp*b_zp (int32 wrap-around, like ORT)."""
        key = ("col", a_zp, None if bias is None else bias.tobytes())
        hit = self.memo.get(key)
        if hit is None:
            zpk = np.int64(a_zp)
            col = -zpk * self.colsum.astype(np.int64) + self.k * zpk * self.zero_point
            if bias is not None:
                n = self.groups * self.cols
                col = col + np.broadcast_to(np.asarray(bias, np.int64).reshape(-1), (n,))
            hit = col.astype(np.int32)
            if len(self.memo) > 64:
                self.memo.clear()
            self.memo[key] = hit
        return hit


def pack_weights(w: np.ndarray, zero_point: np.ndarray | int) -> PackedWeights:
    """Pack w[G, T, C, N] (int8 or uint8; reduction over T*C) once, at session creation."""
    if w.ndim != 4 or w.dtype not in (np.int8, np.uint8):
        raise ValueError(f"pack_weights wants int8/uint8 [G, T, C, N], got {w.dtype} {w.shape}")
    g, t, c, n = w.shape
    zp = np.broadcast_to(np.asarray(zero_point).astype(np.int32).reshape(-1), (g * n,))
    if w.dtype == np.uint8:
        ws = (w.astype(np.int16) - 128).astype(np.int8)
        zp = zp - 128
    else:
        ws = w
    cp = round_up(max(c, 1), 4)
    npad = round_up(max(n, 1), TILE_COLS)
    full = np.zeros((g, t, cp, npad), np.int8)
    full[:, :, :c, :n] = ws
    panels = npad // TILE_COLS
    c4 = cp // 4
    # [g, t, c4, 4, panel, 64] -> [g, panel, t, c4, 64, 4]
    packed = full.reshape(g, t, c4, 4, panels, TILE_COLS).transpose(0, 4, 1, 2, 5, 3)
    colsum = ws.astype(np.int32).sum(axis=(1, 2)).reshape(-1)
    return PackedWeights(
        data=np.ascontiguousarray(packed).reshape(-1),
        colsum=np.ascontiguousarray(colsum, dtype=np.int32),
        zero_point=np.ascontiguousarray(zp, dtype=np.int32),
        k=t * c,
        taps=t,
        c4=c4,
        groups=g,
        cols=n,
        panels=panels,
        has_zero_point=bool(np.any(zp)),
    )


def pack_matrix(b: np.ndarray, zero_point: np.ndarray | int = 0) -> PackedWeights:
    """Pack a K x N weight matrix (zero point scalar or per column)."""
    if b.ndim != 2:
        raise ValueError(f"pack_matrix wants a 2-D matrix, got shape {b.shape}")
    return pack_weights(b[None, None], zero_point)


# --------------------------------------------------------------------------- kernels


@njit(inline="always", **JIT)
def _portable_tile(a, row_off, taps, c4, a_step, b, b_off, tile, rows):
    """Plain-loop twin of the VNNI tile (same layouts), for CPUs without VNNI and for tests.
    Unsigned offsets and one int32 expression per column let LLVM vectorize the column
    loop (stride-4 byte loads become shuffles): 9 -> 80 GOPS at 128x768x768 here."""
    for i in range(rows * TILE_COLS):
        tile[i] = 0
    step = _U(b_off)
    ucols = _U(TILE_COLS)
    for t in range(taps.shape[0]):
        for q in range(c4):
            for r in range(rows):
                base = _U(row_off[r] + taps[t] + a_step * q)
                a0 = np.int32(a[base])
                a1 = np.int32(a[base + _U(1)])
                a2 = np.int32(a[base + _U(2)])
                a3 = np.int32(a[base + _U(3)])
                trow = _U(r) * ucols
                for j in range(ucols):
                    p = step + _U(4) * j
                    tile[trow + j] += (a0 * np.int32(b[p]) + a1 * np.int32(b[p + _U(1)])
                                       + a2 * np.int32(b[p + _U(2)])
                                       + a3 * np.int32(b[p + _U(3)]))
            step += ucols * _U(4)


@njit(inline="always", **JIT)
def _tile(
    nvec,
    a, row_off, m_begin, m_end, a_base, taps, c4, a_step, b, b_off, tile, emode, ncols, col,
    bzp, p0, rowsum, rs0, use_rowsum, out_row_off, o_col0, out_i32, out_q, out_f, mult,
    fscale, fbias, qf,
):
    """VNNI tiles over rows [m_begin, m_end): `nvec` zmm per row (1..3: the narrow tiles of
    NARROW_ROWS[nvec] rows; 4: 6 x 64, or exactly m_end - m_begin < 6 rows), epilogue
    fused (emode 0/1/2) or the raw int32 tile (emode -1, one tile); see vnni.py.
    One call per (task, panel) runs all the task's rows (the row loop is in the kernel)."""
    n = m_end - m_begin
    if nvec == 1:
        vnni_tile_12x16(
            a, row_off, m_begin, m_end, a_base, taps, c4, a_step, b, b_off, tile, emode, ncols, col,
            bzp, p0, rowsum, rs0, use_rowsum, out_row_off, o_col0, out_i32, out_q, out_f, mult,
            fscale, fbias, qf,
        )
    elif nvec == 2:
        vnni_tile_6x32(
            a, row_off, m_begin, m_end, a_base, taps, c4, a_step, b, b_off, tile, emode, ncols, col,
            bzp, p0, rowsum, rs0, use_rowsum, out_row_off, o_col0, out_i32, out_q, out_f, mult,
            fscale, fbias, qf,
        )
    elif nvec == 3:
        vnni_tile_8x48(
            a, row_off, m_begin, m_end, a_base, taps, c4, a_step, b, b_off, tile, emode, ncols, col,
            bzp, p0, rowsum, rs0, use_rowsum, out_row_off, o_col0, out_i32, out_q, out_f, mult,
            fscale, fbias, qf,
        )
    elif n >= 6:
        vnni_tile_6x64(
            a, row_off, m_begin, m_end, a_base, taps, c4, a_step, b, b_off, tile, emode, ncols, col,
            bzp, p0, rowsum, rs0, use_rowsum, out_row_off, o_col0, out_i32, out_q, out_f, mult,
            fscale, fbias, qf,
        )
    elif n == 5:
        vnni_tile_5x64(
            a, row_off, m_begin, m_end, a_base, taps, c4, a_step, b, b_off, tile, emode, ncols, col,
            bzp, p0, rowsum, rs0, use_rowsum, out_row_off, o_col0, out_i32, out_q, out_f, mult,
            fscale, fbias, qf,
        )
    elif n == 4:
        vnni_tile_4x64(
            a, row_off, m_begin, m_end, a_base, taps, c4, a_step, b, b_off, tile, emode, ncols, col,
            bzp, p0, rowsum, rs0, use_rowsum, out_row_off, o_col0, out_i32, out_q, out_f, mult,
            fscale, fbias, qf,
        )
    elif n == 3:
        vnni_tile_3x64(
            a, row_off, m_begin, m_end, a_base, taps, c4, a_step, b, b_off, tile, emode, ncols, col,
            bzp, p0, rowsum, rs0, use_rowsum, out_row_off, o_col0, out_i32, out_q, out_f, mult,
            fscale, fbias, qf,
        )
    elif n == 2:
        vnni_tile_2x64(
            a, row_off, m_begin, m_end, a_base, taps, c4, a_step, b, b_off, tile, emode, ncols, col,
            bzp, p0, rowsum, rs0, use_rowsum, out_row_off, o_col0, out_i32, out_q, out_f, mult,
            fscale, fbias, qf,
        )
    else:
        vnni_tile_1x64(
            a, row_off, m_begin, m_end, a_base, taps, c4, a_step, b, b_off, tile, emode, ncols, col,
            bzp, p0, rowsum, rs0, use_rowsum, out_row_off, o_col0, out_i32, out_q, out_f, mult,
            fscale, fbias, qf,
        )


@njit(inline="always", **JIT)
def _epilogue(
    tile,
    rows,
    ncols,
    m0,
    n0,
    rs0,
    col_term,
    bzp,
    rowsum,
    use_rowsum,
    out_row_off,
    o_col0,
    out_col_stride,
    mode,
    out_i32,
    out_q,
    mult,
    zp,
    lo,
    hi,
    out_f,
    fscale,
    fbias,
    qadd,
    scratch,
):
    """Zero-point corrections in place on the int32 tile, then int32/8-bit/float stores.

    `n0` indexes the per-column parameters, `o_col0` is the output offset of the
    tile's first column (added to each row's `out_row_off`). Mode 3 requantizes to 8
    bits, then applies `requant.requantize_add` with the per-column term in `fbias` and
    `qadd` = (scale, offset, lo, hi).

    Loops index slices with plain range variables (no negative-index fix-ups), so LLVM
    vectorizes them; int32 arithmetic wraps exactly like ORT's int32 accumulator.
    """
    colt = col_term[n0 : n0 + ncols]
    zp_f = np.float32(zp)
    if use_rowsum:
        bz = bzp[n0 : n0 + ncols]
        for r in range(rows):
            t = tile[r * TILE_COLS : r * TILE_COLS + ncols]
            rs = rowsum[rs0 + m0 + r]
            for j in range(ncols):
                t[j] = np.int32(t[j] - bz[j] * rs)
    if out_col_stride == 1 and ncols == TILE_COLS and mode == 1:
        # full panel, 8-bit output (the hot case): constant trip count and unsigned
        # indices, so each row is four straight-line vector blocks, no loop set-up
        for r in range(rows):
            o = _U(out_row_off[m0 + r] + o_col0)
            tb = _U(r * TILE_COLS)
            nb = _U(n0)
            for j in range(_U(TILE_COLS)):
                acc = np.int32(tile[tb + j] + col_term[nb + j])
                out_q[o + j] = requantize_byte(acc, mult[nb + j], zp_f, lo, hi)
    elif out_col_stride == 1 and mode == 1:
        # narrow panel (the last one, or N < 64): parameters padded to 64 once per tile,
        # then the same fixed-width loop into a scratch row and a byte copy; per-row
        # vector-loop set-up cost more than the arithmetic of 16..48 columns
        cpad = scratch[0:TILE_COLS]
        mpad = scratch[TILE_COLS : 2 * TILE_COLS].view(np.float32)
        sq = scratch[2 * TILE_COLS : 3 * TILE_COLS].view(np.uint8)
        nb = _U(n0)
        for j in range(_U(TILE_COLS)):
            inside = j < _U(ncols)
            cpad[j] = col_term[nb + j] if inside else 0
            mpad[j] = mult[nb + j] if inside else np.float32(0)
        for r in range(rows):
            tb = _U(r * TILE_COLS)
            for j in range(_U(TILE_COLS)):
                acc = np.int32(tile[tb + j] + cpad[j])
                sq[j] = requantize_byte(acc, mpad[j], zp_f, lo, hi)
            o = out_row_off[m0 + r] + o_col0
            oq = out_q[o : o + ncols]
            for j in range(ncols):
                oq[j] = sq[j]
    elif out_col_stride == 1:
        # the column term is added in the store loop: one pass over the tile per row
        for r in range(rows):
            t = tile[r * TILE_COLS : r * TILE_COLS + ncols]
            o = out_row_off[m0 + r] + o_col0
            if mode == 0:
                oi = out_i32[o : o + ncols]
                for j in range(ncols):
                    oi[j] = np.int32(t[j] + colt[j])
            elif mode == 1:
                oq = out_q[o : o + ncols]
                ml = mult[n0 : n0 + ncols]
                for j in range(ncols):
                    acc = np.int32(t[j] + colt[j])
                    oq[j] = requantize_byte(acc, ml[j], zp_f, lo, hi)
            elif mode == 3:
                oq = out_q[o : o + ncols]
                ml = mult[n0 : n0 + ncols]
                at = fbias[n0 : n0 + ncols]
                for j in range(ncols):
                    q = requantize_value(np.int32(t[j] + colt[j]), ml[j], zp, lo, hi)
                    y = requantize_add(q, qadd[0], qadd[1], at[j], qadd[2], qadd[3])
                    oq[j] = np.uint8(y & 0xFF)
            else:
                of = out_f[o : o + ncols]
                fs = fscale[n0 : n0 + ncols]
                fb = fbias[n0 : n0 + ncols]
                for j in range(ncols):
                    of[j] = np.float32(np.int32(t[j] + colt[j])) * fs[j] + fb[j]
    else:
        for r in range(rows):
            t = tile[r * TILE_COLS : r * TILE_COLS + ncols]
            for j in range(ncols):
                t[j] = np.int32(t[j] + colt[j])
        for j in range(ncols):
            n = n0 + j
            o = o_col0 + j * out_col_stride
            if mode == 0:
                for r in range(rows):
                    out_i32[out_row_off[m0 + r] + o] = tile[r * TILE_COLS + j]
            elif mode == 1:
                ml = mult[n]
                for r in range(rows):
                    q = requantize_value(tile[r * TILE_COLS + j], ml, zp, lo, hi)
                    out_q[out_row_off[m0 + r] + o] = np.uint8(q & 0xFF)
            elif mode == 3:
                ml = mult[n]
                at = fbias[n]
                for r in range(rows):
                    q = requantize_value(tile[r * TILE_COLS + j], ml, zp, lo, hi)
                    y = requantize_add(q, qadd[0], qadd[1], at, qadd[2], qadd[3])
                    out_q[out_row_off[m0 + r] + o] = np.uint8(y & 0xFF)
            else:
                fs = fscale[n]
                fb = fbias[n]
                for r in range(rows):
                    out_f[out_row_off[m0 + r] + o] = np.float32(tile[r * TILE_COLS + j]) * fs + fb


@njit(**JIT)
def _gemm_tiles(
    counters,
    a,
    rowsum,
    out_i32,
    out_q,
    out_f,
    row_off,
    group_stride,
    taps,
    c4,
    a_step,
    bpack,
    panel_bytes,
    groups,
    cols,
    panels,
    m_total,
    m_block,
    col_term,
    bzp,
    use_rowsum,
    out_row_off,
    out_col_stride,
    out_group_stride,
    mode,
    mult,
    y_zp,
    q_lo,
    q_hi,
    fscale,
    fbias,
    use_vnni,
    pg_size,
    qadd,
):
    """Claims (group, panel group, row block) tasks; epilogue straight from the tile.

    A panel group is `pg_size` 64-column panels (~256 KB of weights, L2-resident while
    the row blocks stream past it). A task covers all panels of its group for its rows:
    when the group spans all columns, each thread writes whole output rows, so two
    threads never share an output cache line (panels of narrow outputs used to).

    VNNI, unit-stride output (every hot path): per panel, one micro-kernel call runs
    the task's rows with the epilogue fused; full panels in 6 x 64 tiles, a last panel
    with <= 48 real columns in the narrow tile of ceil(cols/16) vectors (vnni.NARROW_ROWS
    rows; a block's last tile repeats its last real row, or runs as exact rows of the
    64-column tile when that is cheaper). The task's per-column parameters are first
    copied to scratch padded to whole panels, so the kernel reads full vectors and masks
    only its stores. Portable kernel or strided output: 6 x 64 int32 tiles (rows outer,
    panels inner) and the numba `_epilogue`. Mode 3 (8-bit, then a `ColumnAdd`): its
    per-column term travels as `fbias`, its scalars as `qadd` (scale, offset, lo, hi).
    """
    m_blocks = (m_total + m_block - 1) // m_block
    n_pg = (panels + pg_size - 1) // pg_size
    per_group = m_blocks * n_pg
    ntasks = groups * per_group
    lo = np.float32(q_lo - y_zp)
    hi = np.float32(q_hi - y_zp)
    zp = np.int32(y_zp)
    # the fused requantization's zp, lo, hi, then the add's scale, offset, lo, hi (float32)
    qf = np.empty(7, np.float32)
    qf[0] = np.float32(zp)
    qf[1] = lo
    qf[2] = hi
    for i in range(4):
        qf[3 + i] = qadd[i]
    tile = np.empty(TILE_ROWS * TILE_COLS, np.int32)
    scratch = np.empty(3 * TILE_COLS, np.int32)
    offs = np.empty(MAX_ROWS, np.int64)
    fused = use_vnni and out_col_stride == 1
    # the task's column parameters, padded with zeros to whole panels
    npad = (pg_size if use_vnni else 0) * TILE_COLS
    pcol = np.zeros(npad, np.int32)
    pbz = np.zeros(npad if use_rowsum else 0, np.int32)
    pmul = np.zeros(npad if mode == 1 or mode == 3 else 0, np.float32)
    pfs = np.zeros(npad if mode == 2 else 0, np.float32)
    pfb = np.zeros(npad if mode == 2 or mode == 3 else 0, np.float32)
    staged_g = -1
    staged_pg = -1
    while True:
        task = claim(counters)
        if task >= ntasks:
            break
        g = task // per_group
        rem = task - g * per_group
        pgi = rem // m_blocks
        mb = rem - pgi * m_blocks
        p_start = pgi * pg_size
        p_end = min(panels, (pgi + 1) * pg_size)
        m_begin = mb * m_block
        m_end = min(m_total, m_begin + m_block)
        if not fused:
            for m0 in range(m_begin, m_end, MAX_ROWS):
                rows = min(MAX_ROWS, m_end - m0)
                for r in range(rows):
                    offs[r] = row_off[m0 + r] + g * group_stride
                for panel in range(p_start, p_end):
                    b_off = (g * panels + panel) * panel_bytes
                    n0 = panel * TILE_COLS
                    ncols = min(TILE_COLS, cols - n0)
                    if use_vnni:  # the raw int32 tile (emode -1)
                        _tile(4, a, row_off, m0, m0 + rows, g * group_stride, taps, c4, a_step,
                              bpack, b_off, tile, -1, ncols, pcol, pbz, 0, rowsum, g * m_total,
                              use_rowsum, out_row_off, 0, out_i32, out_q, out_f, pmul, pfs,
                              pfb, qf)
                    else:
                        _portable_tile(a, offs, taps, c4, a_step, bpack, b_off, tile, rows)
                    _epilogue(tile, rows, ncols, m0, g * cols + n0, g * m_total, col_term, bzp,
                              rowsum, use_rowsum, out_row_off,
                              g * out_group_stride + n0 * out_col_stride, out_col_stride, mode,
                              out_i32, out_q, mult, zp, lo, hi, out_f, fscale, fbias, qadd,
                              scratch)
            finish(counters)
            continue
        if g != staged_g or pgi != staged_pg:
            # (unsigned indices: plain vector copies, no negative-index gathers)
            staged_g = g
            staged_pg = pgi
            c0 = _U(g * cols + p_start * TILE_COLS)
            nreal = _U(min(cols, p_end * TILE_COLS) - p_start * TILE_COLS)
            for j in range(nreal):
                pcol[j] = col_term[c0 + j]
            for j in range(nreal, _U((p_end - p_start) * TILE_COLS)):
                pcol[j] = 0
            if use_rowsum:
                for j in range(nreal):
                    pbz[j] = bzp[c0 + j]
            if mode == 1 or mode == 3:
                for j in range(nreal):
                    pmul[j] = mult[c0 + j]
            if mode == 2:
                for j in range(nreal):
                    pfs[j] = fscale[c0 + j]
            if mode == 2 or mode == 3:
                for j in range(nreal):
                    pfb[j] = fbias[c0 + j]
        for panel in range(p_start, p_end):
            n0 = panel * TILE_COLS
            ncols = min(TILE_COLS, cols - n0)
            nvec = (ncols + 15) // 16
            step = MAX_ROWS if nvec == 4 else NARROW_ROWS[nvec]
            # a short remainder runs as exact rows of the 64-column tile when that is
            # cheaper than a narrow tile repeating its last row
            m_mid = m_end
            rem = (m_end - m_begin) % step
            if rem > 0 and rem * 4 <= step * nvec:
                m_mid = m_end - rem
            b_off = (g * panels + panel) * panel_bytes
            o_col0 = g * out_group_stride + n0
            p0 = (panel - p_start) * TILE_COLS
            if m_mid > m_begin:
                _tile(nvec, a, row_off, m_begin, m_mid, g * group_stride, taps, c4, a_step,
                      bpack, b_off, tile, mode, ncols, pcol, pbz, p0, rowsum, g * m_total,
                      use_rowsum, out_row_off, o_col0, out_i32, out_q, out_f, pmul, pfs, pfb,
                      qf)
            if m_mid < m_end:
                _tile(4, a, row_off, m_mid, m_end, g * group_stride, taps, c4, a_step, bpack,
                      b_off, tile, mode, ncols, pcol, pbz, p0, rowsum, g * m_total, use_rowsum,
                      out_row_off, o_col0, out_i32, out_q, out_f, pmul, pfs, pfb, qf)
        finish(counters)


@njit(**JIT)
def _row_sums(a, row_off, group_stride, taps, width, groups, out):
    """out[g*M + m] = sum of the activations row m of group g reads (real channels only)."""
    m_total = row_off.shape[0]
    for gm in range(groups * m_total):
        g = gm // m_total
        m = gm - g * m_total
        base = row_off[m] + g * group_stride
        s = np.int32(0)  # < 2^31 for any K below 8M
        for t in range(taps.shape[0]):
            p = base + taps[t]
            seg = a[p : p + width]  # a slice loop from 0 vectorizes; a[p + c] did not
            for c in range(width):
                s += np.int32(seg[c])
        out[gm] = s


@njit(**JIT)
def _pack_row_tiles(counters, a, a8, flip, out, rowsum):
    """out[g][tile][q][r] = a[g, tile*MR + r, q] ^ flip, on 4-byte words; row sums of the bytes.

    `a` is A viewed as uint32 words [G, M, K/4] (K padded to 4 with zeros, any strides),
    `a8` the same bytes [G, M, K]; flip 0x80808080 adds 128 to every byte mod 256
    (int8 -> uint8). Rows past M are zero. One task = 8 tiles of one batch entry g.
    Row sums are a separate byte loop (vectorized), not shifts of each copied word.
    """
    nb, m_total, k4 = a.shape
    kb = a8.shape[2]
    tiles = (m_total + MAX_ROWS - 1) // MAX_ROWS
    want = rowsum.shape[0] > 0
    chunks = (tiles + 7) // 8
    ntasks = nb * chunks
    fb = np.uint8(flip & np.uint32(0xFF))
    while True:
        task = claim(counters)
        if task >= ntasks:
            break
        g = task // chunks
        t0 = (task - g * chunks) * 8
        for t in range(t0, min(tiles, t0 + 8)):
            base = (g * tiles + t) * k4 * MAX_ROWS
            for r in range(MAX_ROWS):
                m = t * MAX_ROWS + r
                if m < m_total:
                    row = a[g, m]
                    for q in range(k4):
                        out[base + q * MAX_ROWS + r] = row[q] ^ flip
                    if want:
                        bytes_ = a8[g, m]
                        s = np.int32(0)
                        for kk in range(kb):
                            s += np.int32(bytes_[kk] ^ fb)
                        rowsum[g * m_total + m] = s
                else:
                    for q in range(k4):
                        out[base + q * MAX_ROWS + r] = np.uint32(0)
        finish(counters)


@njit(**JIT)
def _pack_b_panels(counters, b, flip, zp, a_zp, out, colsum, col_term):
    """Per-call packing of B [G, K, N] (uint8 bytes, any strides: a transposed view of
    K or of V needs no copy first) into [G][panel][K/4][64] 4-byte words (byte ^ flip:
    uint8 -> int8 is b - 128), plus column sums and the column term
    -a_zp*colsum + K*a_zp*zp (int32 wrap-around).

    Used for activation x activation products (attention); constant weights go through
    `pack_weights` once instead. Each word gathers 4 consecutive K of one column, the
    inner loops run over 64 columns (contiguous words out, vectorized sums).
    Padding (K to 4, N to 64) is zero. One task per (g, panel).
    """
    nb, k, n = b.shape
    panels = (n + TILE_COLS - 1) // TILE_COLS
    k4 = (k + 3) // 4
    pwords = k4 * TILE_COLS
    ntasks = nb * panels
    cs = np.empty(TILE_COLS, np.int32)
    cross = np.int32(k * a_zp * zp)
    unflip = flip ^ np.uint8(0x80)  # byte ^ unflip = (the int8 value) + 128
    fw = np.uint32(flip) * np.uint32(0x01010101)
    while True:
        task = claim(counters)
        if task >= ntasks:
            break
        g = task // panels
        p = task - g * panels
        n0 = p * TILE_COLS
        nc = min(TILE_COLS, n - n0)
        base = task * pwords
        for j in range(TILE_COLS):
            cs[j] = 0
        for q in range(k4):
            o = out[base + q * TILE_COLS : base + (q + 1) * TILE_COLS]
            kk = 4 * q
            if kk + 4 <= k:
                r0 = b[g, kk, n0 : n0 + nc]
                r1 = b[g, kk + 1, n0 : n0 + nc]
                r2 = b[g, kk + 2, n0 : n0 + nc]
                r3 = b[g, kk + 3, n0 : n0 + nc]
                for j in range(nc):
                    o[j] = (
                        np.uint32(r0[j])
                        | (np.uint32(r1[j]) << np.uint32(8))
                        | (np.uint32(r2[j]) << np.uint32(16))
                        | (np.uint32(r3[j]) << np.uint32(24))
                    ) ^ fw
                    cs[j] += (
                        np.int32(r0[j] ^ unflip) + np.int32(r1[j] ^ unflip)
                        + np.int32(r2[j] ^ unflip) + np.int32(r3[j] ^ unflip)
                    )
            else:  # the last, partial group of K: missing bytes are zero weights
                for j in range(nc):
                    w = np.uint32(0)
                    for sub in range(k - kk):
                        v = b[g, kk + sub, n0 + j]
                        w |= np.uint32(v ^ flip) << np.uint32(8 * sub)
                        cs[j] += np.int32(v ^ unflip)
                    o[j] = w
            for j in range(nc, TILE_COLS):
                o[j] = np.uint32(0)
        for j in range(nc):
            s = cs[j] - 128 * k
            colsum[g * n + n0 + j] = s
            col_term[g * n + n0 + j] = np.int32(cross - a_zp * s)
        finish(counters)


# --------------------------------------------------------------------------- wrappers

_EMPTY_I32 = np.zeros(0, np.int32)
_EMPTY_U8 = np.zeros(0, np.uint8)
_EMPTY_F32 = np.zeros(0, np.float32)
_NO_ADD = np.zeros(4, np.float32)


#: Epilogue cost of one 16-column vector of one row, in reduction steps (one step = one
#: vpdpbusd per vector); the fused requantization is ~7 vector ops.
EPILOGUE_STEPS = 5
#: Target kernel cost of a task (vpdpbusd-equivalents, ~1.5 us): claiming a task and
#: staging its column parameters must stay small next to it.
TASK_COST = 4096


def _row_cost(packed: PackedWeights, pg_size: int) -> int:
    """Cost of one output row of a task (`pg_size` panels), in vpdpbusd-equivalents."""
    vecs = min(4 * pg_size, -(-packed.cols // 16))
    return vecs * (packed.taps * packed.c4 + EPILOGUE_STEPS)


def _pick_row_block(m: int, tasks_per_row_block: int, row_cost: int = 0) -> int:
    """Row block (multiple of MR): >= 16 tasks and at most 48 rows (but see below), so the
    last task a thread claims is short (the caller waits for it) while A stays in L1/L2.

    Cheap rows (small K, narrow N: MobileNet pointwise convs) get longer blocks, up to
    ~TASK_COST per task, as long as there are still 16 tasks; blocks longer than 48 rows
    are multiples of 24 rows (every tile height: 6, 8, 12)."""
    want_blocks = max(1, -(-16 // max(tasks_per_row_block, 1)))
    block = max(1, -(-m // want_blocks))
    cap = max(8 * MAX_ROWS, TASK_COST // row_cost) if row_cost > 0 else 8 * MAX_ROWS
    block = min(block, cap)
    block = block // 24 * 24 if block > 8 * MAX_ROWS else round_up(block, MAX_ROWS)
    return max(MAX_ROWS, block)


def _panel_group(packed: PackedWeights, m: int) -> int:
    """Panels per task: ~256 KB of packed weights (stays in L2), but few-row products
    (M=1 heads: memory-bound) still get >= 8 tasks to share between threads."""
    pg = max(1, min(packed.panels, (256 * 1024) // max(packed.step_bytes, 1)))
    max_row_blocks = -(-m // MAX_ROWS)
    want_pg = -(-8 // max_row_blocks)
    if want_pg > 1:
        pg = min(pg, max(1, packed.panels // want_pg))
    return pg


class PackedLaunch:
    """One prepared driver call: every argument except the activations, row sums and
    output, computed once per (shape, zero points, scales) and reused for every call.

    Why: the Python setup of a call (offsets, column terms, multipliers, 30 numba
    arguments) used to cost 20-40 us, as much as a small convolution's arithmetic.
    """

    __slots__ = ("const", "ntasks", "work", "mode", "need_rowsum", "rowsum_args", "groups",
                 "m_total")

    def __init__(
        self,
        row_off: np.ndarray,
        group_stride: int,
        taps: np.ndarray,
        a_zp: int,
        packed: PackedWeights,
        *,
        mode: int,
        out_row_off: np.ndarray,
        out_col_stride: int,
        out_group_stride: int | None = None,
        bias: np.ndarray | None = None,
        mult: np.ndarray | None = None,
        y_zp: int = 0,
        q_range: tuple[int, int] = (0, 255),
        fscale: np.ndarray | None = None,
        fbias: np.ndarray | None = None,
        use_vnni: bool | None = None,
        a_step: int = 4,
        col_term: np.ndarray | None = None,
        add: ColumnAdd | None = None,
    ) -> None:
        if (mode == OUT_QUANTIZED_ADD) != (add is not None):
            raise ValueError("the quantize-then-add epilogue needs exactly a ColumnAdd")
        m_total = row_off.shape[0]
        ncols_all = packed.groups * packed.cols
        if col_term is None:
            col_term = packed.column_term(int(a_zp), None if bias is None else np.asarray(bias))
        vnni = config.use_vnni() if use_vnni is None else use_vnni
        pg_size = _panel_group(packed, m_total)
        n_pg = -(-packed.panels // pg_size)
        m_block = _pick_row_block(m_total, packed.groups * n_pg, _row_cost(packed, pg_size))
        if fscale is not None and fbias is None:
            fbias = np.zeros(ncols_all, np.float32)
        if add is not None and fbias is None:  # the add's term rides in the fbias slot
            fbias = np.broadcast_to(add.term, (ncols_all,))
        if out_group_stride is None:
            out_group_stride = packed.cols * out_col_stride
        self.mode = mode
        self.groups = packed.groups
        self.m_total = m_total
        self.need_rowsum = packed.has_zero_point
        self.rowsum_args = (
            row_off, np.int64(group_stride), taps, np.int64(packed.c4 * 4), np.int64(packed.groups)
        )
        m_blocks = -(-m_total // m_block)
        self.ntasks = packed.groups * n_pg * m_blocks
        # multiply-adds at the kernel's rate: padded K, 16-column vectors, the epilogue;
        # streaming the packed weights costs too (M=1 heads are memory-bound)
        steps = packed.taps * packed.c4 + EPILOGUE_STEPS
        vecs = packed.groups * -(-packed.cols // 16)
        self.work = m_total * vecs * steps * 64 + packed.data.size * 4
        self.const = (
            row_off,
            np.int64(group_stride),
            taps,
            np.int64(packed.c4),
            np.int64(a_step),
            packed.data,
            np.int64(packed.step_bytes),
            np.int64(packed.groups),
            np.int64(packed.cols),
            np.int64(packed.panels),
            np.int64(m_total),
            np.int64(m_block),
            np.ascontiguousarray(col_term, np.int32),
            packed.zero_point,
            bool(packed.has_zero_point),
            out_row_off,
            np.int64(out_col_stride),
            np.int64(out_group_stride),
            np.int64(mode),
            _EMPTY_F32 if mult is None else np.ascontiguousarray(mult, np.float32),
            np.int64(y_zp),
            np.int64(q_range[0]),
            np.int64(q_range[1]),
            _EMPTY_F32 if fscale is None else np.ascontiguousarray(fscale, np.float32),
            _EMPTY_F32 if fbias is None else np.ascontiguousarray(fbias, np.float32),
            bool(vnni),
            np.int64(pg_size),
            _NO_ADD if add is None else add.params,
        )

    def _rowsum(self, a: np.ndarray, rowsum: np.ndarray | None) -> np.ndarray:
        """The row sums the zero-point correction needs (computed here for unpacked A)."""
        if not self.need_rowsum:
            return _EMPTY_I32
        if rowsum is None:
            if int(self.const[4]) != 4:
                raise ValueError("row sums of tile-packed activations must come from the packing")
            rowsum = np.empty(self.groups * self.m_total, np.int32)
            unrecorded()  # a serial pass outside run_tasks: not replayable
            _row_sums(a, *self.rowsum_args, rowsum)
        return rowsum

    def run(self, a: np.ndarray, out: np.ndarray, rowsum: np.ndarray | None = None) -> None:
        """Drive the tiles over activation buffer `a` (flat uint8) into flat `out`."""
        rowsum = self._rowsum(a, rowsum)
        mode = self.mode
        run_tasks(
            _gemm_tiles,
            self.ntasks,
            self.work,
            a,
            rowsum,
            out if mode == OUT_INT32 else _EMPTY_I32,
            out.view(np.uint8) if mode in (OUT_QUANTIZED, OUT_QUANTIZED_ADD) else _EMPTY_U8,
            out if mode == OUT_FLOAT else _EMPTY_F32,
            *self.const,
        )


    def run_with(
        self,
        a: np.ndarray,
        out: np.ndarray,
        rowsum: np.ndarray | None,
        packed: PackedWeights,
        col_term: np.ndarray,
    ) -> None:
        """`run` with per-call packed weights of the same shape and zero point."""
        c = self.const
        mode = self.mode
        run_tasks(
            _gemm_tiles,
            self.ntasks,
            self.work,
            a,
            self._rowsum(a, rowsum),
            out if mode == OUT_INT32 else _EMPTY_I32,
            out.view(np.uint8) if mode in (OUT_QUANTIZED, OUT_QUANTIZED_ADD) else _EMPTY_U8,
            out if mode == OUT_FLOAT else _EMPTY_F32,
            *c[:5],
            packed.data,
            *c[6:12],
            col_term,
            packed.zero_point,
            *c[14:],
        )


def run_packed(
    a: np.ndarray,
    row_off: np.ndarray,
    group_stride: int,
    taps: np.ndarray,
    a_zp: int,
    packed: PackedWeights,
    *,
    mode: int,
    out: np.ndarray,
    out_row_off: np.ndarray,
    out_col_stride: int,
    bias: np.ndarray | None = None,
    mult: np.ndarray | None = None,
    y_zp: int = 0,
    q_range: tuple[int, int] = (0, 255),
    fscale: np.ndarray | None = None,
    fbias: np.ndarray | None = None,
    use_vnni: bool | None = None,
    a_step: int = 4,
    rowsum: np.ndarray | None = None,
    add: ColumnAdd | None = None,
) -> None:
    """One-off driver call over a prepared uint8 activation buffer into `out` (flat).

    `a_zp` is the activation zero point in the uint8 domain of `a` (already shifted).
    `bias` (int32 per column) is added to the accumulator; `fscale`/`fbias` are the
    float epilogue's per-column scale and bias; `add` is mode OUT_QUANTIZED_ADD's second
    stage. `a_step` is the byte distance between consecutive 4-byte groups of one row
    (4 unpacked, 4*MR for A packed in tiles); `rowsum` may be given when the packing
    already computed it. Hot paths keep a `PackedLaunch` instead.
    """
    PackedLaunch(
        row_off, group_stride, taps, a_zp, packed, mode=mode, out_row_off=out_row_off,
        out_col_stride=out_col_stride, bias=bias, mult=mult, y_zp=y_zp, q_range=q_range,
        fscale=fscale, fbias=fbias, use_vnni=use_vnni, a_step=a_step, add=add,
    ).run(a, out, rowsum)


def pack_rows(
    a: np.ndarray, want_rowsum: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """A [M, K] or [G, M, K] (uint8/int8) packed per call into MR-row tiles
    [G][M/MR][K4][MR][4] (uint8).

    One contiguous stream per tile keeps the micro-kernel's broadcasts in cache lines
    the prefetcher already fetched. int8 is shifted by +128 on the way, K is padded
    with zeros (weights are 0 there too) and row sums come out of the same pass.
    Returns (buffer, row offsets within one batch entry, row sums or None, shift).
    """
    if a.dtype not in ACT_SHIFT:
        raise TypeError(f"activations must be uint8 or int8, got {a.dtype}")
    shift = ACT_SHIFT[a.dtype]
    a3 = a if a.ndim == 3 else a[None]
    g, m, k = a3.shape
    kp = round_up(max(k, 1), 4)
    mp = round_up(max(m, 1), MAX_ROWS)
    # rows read in place when each row is contiguous (a transposed-heads view of Q is)
    rows_contiguous = a3.strides[-1] == a3.itemsize and all(st % 4 == 0 for st in a3.strides[:-1])
    a8 = (a3 if rows_contiguous or a3.flags.c_contiguous else np.ascontiguousarray(a3)).view(
        np.uint8
    )
    if kp != k:
        a8 = np.pad(a8, ((0, 0), (0, 0), (0, kp - k)), constant_values=0x80 if shift else 0)
    buf = np.empty(g * mp * kp, np.uint8)
    rowsum = np.empty(g * m if want_rowsum else 0, np.int32)
    tiles = mp // MAX_ROWS
    run_tasks(
        _pack_row_tiles,
        g * -(-tiles // 8),
        g * m * kp * 32,
        a8.view(np.uint32),
        a8,
        np.uint32(0x80808080 if shift else 0),
        buf.view(np.uint32),
        rowsum,
    )
    return buf, _tile_row_offsets(m, kp), (rowsum if want_rowsum else None), shift


def pack_batched(
    b: np.ndarray, zero_point: int, a_zp: int = 0
) -> tuple[PackedWeights, np.ndarray]:
    """Pack B [G, K, N] (uint8/int8, per-tensor zero point) per call, in one numba pass.

    For activation x activation matmuls (attention QK^T, AV): G batch entries become
    the driver's groups, so all heads run in one call with tasks over (head, panel).
    Also returns the column term for activations with (uint8-domain) zero point a_zp.
    """
    if b.ndim != 3 or b.dtype not in (np.int8, np.uint8):
        raise ValueError(f"pack_batched wants int8/uint8 [G, K, N], got {b.dtype} {b.shape}")
    g, k, n = b.shape
    panels = -(-max(n, 1) // TILE_COLS)
    c4 = -(-max(k, 1) // 4)
    data = np.empty(g * panels * c4 * TILE_COLS * 4, np.int8)
    colsum = np.empty(g * n, np.int32)
    col_term = np.empty(g * n, np.int32)
    zp = int(zero_point)
    flip = 0
    if b.dtype == np.uint8:
        flip, zp = 0x80, zp - 128
    run_tasks(
        _pack_b_panels,
        g * panels,
        g * k * n * 8,
        b.view(np.uint8),
        np.uint8(flip),
        np.int32(zp),
        np.int32(a_zp),
        data.view(np.uint32),
        colsum,
        col_term,
    )
    packed = PackedWeights(
        data=data,
        colsum=colsum,
        zero_point=np.full(g * n, zp, np.int32),
        k=k,
        taps=1,
        c4=c4,
        groups=g,
        cols=n,
        panels=panels,
        has_zero_point=zp != 0,
    )
    return packed, col_term


@functools.lru_cache(maxsize=256)
def _tile_row_offsets(m: int, kp: int) -> np.ndarray:
    idx = np.arange(m, dtype=np.int64)
    off = (idx // MAX_ROWS) * (MAX_ROWS * kp) + (idx % MAX_ROWS) * 4
    off.flags.writeable = False
    return off


@functools.lru_cache(maxsize=256)
def _strided_offsets(m: int, stride: int) -> np.ndarray:
    off = np.arange(m, dtype=np.int64) * stride
    off.flags.writeable = False
    return off


_TAP0 = np.zeros(1, np.int64)
_Q_RANGE = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}
_MODES = {np.dtype(np.int32): OUT_INT32, np.dtype(np.float32): OUT_FLOAT,
          np.dtype(np.uint8): OUT_QUANTIZED, np.dtype(np.int8): OUT_QUANTIZED}


def _bytes_key(v: np.ndarray | None) -> bytes | None:
    return None if v is None else np.ascontiguousarray(v).tobytes()


def _gemm_launch(
    packed: PackedWeights,
    g: int,
    m: int,
    kp: int,
    a_zp: int,
    out_dtype: np.dtype,
    bias: np.ndarray | None,
    mult: np.ndarray | None,
    y_zp: int,
    fscale: np.ndarray | None,
    fbias: np.ndarray | None,
    use_vnni: bool | None,
    memo: bool,
    direct: bool = False,
    add: ColumnAdd | None = None,
) -> PackedLaunch:
    """The PackedLaunch of a (batched) GEMM, memoized on the weights.

    A is tile-packed ([G][M/MR][K/4][MR][4], `pack_rows`), or with `direct` read in
    place: uint8 [G, M, K] C-contiguous with K % 4 == 0, row m at byte m*K.
    `out_dtype` is the GEMM's own (first-stage) output type, also with `add`.
    """
    key = ("gemm", g, m, kp, a_zp, out_dtype.str, y_zp, use_vnni, config.kernel_choice(),
           direct, _bytes_key(bias), _bytes_key(mult), _bytes_key(fscale), _bytes_key(fbias),
           None if add is None else add.key())
    hit = packed.memo.get(key) if memo else None
    if hit is not None:
        return hit
    mode = _MODES.get(out_dtype)
    if mode is None:
        raise TypeError(f"unsupported output dtype {out_dtype}")
    if mode == OUT_FLOAT and fscale is None:
        raise ValueError("float output needs fscale")
    if mode == OUT_QUANTIZED and mult is None:
        raise ValueError("quantized output needs mult")
    if add is not None:
        if mode != OUT_QUANTIZED or fbias is not None:
            raise ValueError("a ColumnAdd follows an 8-bit output (and has no fbias)")
        mode, fbias = OUT_QUANTIZED_ADD, np.broadcast_to(add.term, (packed.cols,))
    n_all = packed.groups * packed.cols
    if g > 1:  # per-column parameters repeat per batch entry
        mult = None if mult is None else np.tile(np.broadcast_to(mult, (packed.cols,)), g)
        fscale = None if fscale is None else np.tile(np.broadcast_to(fscale, (packed.cols,)), g)
        fbias = None if fbias is None else np.tile(np.broadcast_to(fbias, (packed.cols,)), g)
        if bias is not None:
            bias = np.tile(np.broadcast_to(bias, (packed.cols,)), g)
    col_term = None
    if g > 1 or not memo:
        col_term = _column_term(packed, a_zp, bias, n_all)
    launch = PackedLaunch(
        _strided_offsets(m, kp) if direct else _tile_row_offsets(m, kp),
        m * kp if direct else round_up(max(m, 1), MAX_ROWS) * kp,
        _TAP0,
        a_zp,
        packed,
        mode=mode,
        out_row_off=_strided_offsets(m, packed.cols),
        out_col_stride=1,
        out_group_stride=m * packed.cols,
        bias=bias,
        mult=mult,
        y_zp=y_zp,
        q_range=_Q_RANGE.get(out_dtype, (0, 255)),
        fscale=fscale,
        fbias=fbias,
        use_vnni=use_vnni,
        a_step=4 if direct else 4 * MAX_ROWS,
        col_term=col_term,
        add=add,
    )
    if memo:
        if len(packed.memo) > 64:
            packed.memo.clear()
        packed.memo[key] = launch
    return launch


def _column_term(packed: PackedWeights, a_zp: int, bias: np.ndarray | None, n: int) -> np.ndarray:
    """int32 bias - a_zp*colsum + K*a_zp*b_zp per column, without memoizing (per-call B)."""
    zpk = np.int64(a_zp)
    col = -zpk * packed.colsum.astype(np.int64) + packed.k * zpk * packed.zero_point
    if bias is not None:
        col = col + np.broadcast_to(np.asarray(bias, np.int64).reshape(-1), (n,))
    return col.astype(np.int32)


def _check(a: np.ndarray, packed: PackedWeights) -> None:
    g = 1 if a.ndim == 2 else a.shape[0]
    if (
        a.ndim not in (2, 3)
        or packed.groups != g
        or packed.taps != 1
        or a.shape[-1] != packed.k
    ):
        raise ValueError(
            f"A {a.shape} does not match packed weights (K={packed.k}, groups={packed.groups})"
        )


def _activation_rows(
    a: np.ndarray, whole_groups: bool, want_rowsum: bool
) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(buffer the driver reads, row sums or None, whether A is read directly): the
    direct rows when `_direct_rows` allows them, else packed tiles."""
    direct = _direct_rows(a, whole_groups)
    if direct is not None:
        return direct, None, True
    unrecorded()  # pack_rows runs its kernels directly
    buf, _, rowsum, _ = pack_rows(a, want_rowsum)
    return buf, rowsum, False


def _direct_rows(a: np.ndarray, whole_groups: bool) -> np.ndarray | None:
    """A as the flat uint8 rows the driver reads directly (row m at byte m*K), or None
    when it needs `pack_rows` (K not a multiple of 4: packing pads it).

    uint8 C-contiguous A is used in place; int8 A costs one vectorized XOR 0x80 into a
    new buffer (the +128 shift), far cheaper than packing tiles.
    """
    if not whole_groups:
        return None
    if a.dtype == np.uint8:
        return a.reshape(-1) if a.flags.c_contiguous else None
    flipped = np.empty(a.size, np.uint8)
    if not a.flags.c_contiguous:
        unrecorded()  # numpy gathers the strided rows first
        a = np.ascontiguousarray(a)
    src = a.reshape(-1).view(np.uint8)
    run_tasks(_flip_bytes, -(-src.size // FLIP_CHUNK), src.size * FLIP_WORK, src, flipped)
    return flipped


#: Bytes per task of `_flip_bytes`, and its work per byte (a byte op, as conv.BYTE_WORK).
FLIP_CHUNK = 1 << 16
FLIP_WORK = 32


@njit(**JIT)
def _flip_bytes(counters, src, dst):  # pragma: no cover
    """dst = src ^ 0x80: int8 activations as the uint8 the micro-kernel multiplies."""
    n = src.shape[0]
    while True:
        t = claim(counters)
        if t * FLIP_CHUNK >= n:
            break
        lo = t * FLIP_CHUNK
        hi = min(n, lo + FLIP_CHUNK)
        s = src[lo:hi]
        d = dst[lo:hi]
        for i in range(hi - lo):
            d[i] = s[i] ^ np.uint8(0x80)
        finish(counters)


def gemm(
    a: np.ndarray,
    a_zp: int,
    packed: PackedWeights,
    *,
    out_dtype: type = np.int32,
    bias: np.ndarray | None = None,
    mult: np.ndarray | None = None,
    y_zp: int = 0,
    fscale: np.ndarray | None = None,
    fbias: np.ndarray | None = None,
    use_vnni: bool | None = None,
    memo: bool = True,
    add: ColumnAdd | None = None,
) -> np.ndarray:
    """(A - a_zp)(B - b_zp) for A [M, K] uint8/int8 and packed B, into out_dtype [M, N].

    A may also be [G, M, K] with B packed as G groups (`pack_batched` or constant
    batched weights): one driver call for all G products, output [G, M, N].
    out_dtype int32: the exact accumulator (+ int32 bias). uint8/int8: requantized with
    per-column `mult` and `y_zp`. float32: acc * fscale[n] + fbias[n]. With `add`, the
    8-bit result then goes through that per-column QLinearAdd in the same epilogue and
    the output has `add.out_dtype`. The launch is memoized on `packed` (set memo=False
    for weights packed per call).
    """
    _check(a, packed)
    g = 1 if a.ndim == 2 else a.shape[0]
    m = a.shape[-2]
    n = packed.cols
    out_dtype = np.dtype(out_dtype)
    kp = round_up(max(packed.k, 1), 4)
    buf, rowsum, direct = _activation_rows(a, kp == packed.k, packed.has_zero_point)
    launch = _gemm_launch(packed, g, m, kp, int(a_zp) + ACT_SHIFT[a.dtype], out_dtype, bias,
                          mult, int(y_zp), fscale, fbias, use_vnni, memo, direct, add)
    store = out_dtype if add is None else add.out_dtype
    out = np.empty((g, m, n) if a.ndim == 3 else (m, n), store)
    launch.run(buf, out.reshape(-1), rowsum)
    return out


class GemmCall:
    """`gemm` for one 2-D activation shape, dtype and contiguity with every other argument
    fixed: the launch is resolved once, so a call is the activation step and the driver.

    Why: `gemm` rebuilds its memo key per call (it hashes the multipliers), ~5 us of the
    20 us an M=1 classifier head takes.
    """

    __slots__ = ("packed", "launch", "out_shape", "out_dtype", "whole", "replayed")

    def __init__(self, a: np.ndarray, a_zp: int, packed: PackedWeights, *, out_dtype: type,
                 mult: np.ndarray | None = None, y_zp: int = 0,
                 add: ColumnAdd | None = None) -> None:
        if a.ndim != 2:
            raise ValueError(f"GemmCall wants a 2-D activation, got shape {a.shape}")
        _check(a, packed)
        kp = round_up(max(packed.k, 1), 4)
        self.packed = packed
        self.whole = kp == packed.k
        # the same choice `_direct_rows` makes per call (callers key on contiguity)
        direct = self.whole and (a.dtype != np.uint8 or a.flags.c_contiguous)
        shift = ACT_SHIFT[a.dtype]
        out_dtype = np.dtype(out_dtype)
        self.launch = _gemm_launch(packed, 1, a.shape[0], kp, int(a_zp) + shift, out_dtype,
                                   None, mult, int(y_zp), None, None, None, True, direct, add)
        self.out_shape = (a.shape[0], packed.cols)
        self.out_dtype = out_dtype if add is None else add.out_dtype
        # replayed natively after the first call: the 34-argument launch through numba's
        # dispatcher was ~3 us of a 16 us M=1 head
        self.replayed = Replayed(self._run, fixed=True)  # one signature per GemmCall

    def __call__(self, a: np.ndarray) -> np.ndarray:
        return self.replayed(a)[0]

    def _run(self, a: np.ndarray) -> tuple[np.ndarray]:
        buf, rowsum, _ = _activation_rows(a, self.whole, self.packed.has_zero_point)
        out = np.empty(self.out_shape, self.out_dtype)
        self.launch.run(buf, out.reshape(-1), rowsum)
        return (out,)


#: Launch templates of activation x activation products, by shape and parameters.
_ACT_LAUNCHES: dict = {}


def gemm_batched(
    a: np.ndarray,
    a_zp: int,
    b: np.ndarray,
    b_zp: int,
    *,
    out_dtype: type = np.int32,
    mult: np.ndarray | None = None,
    y_zp: int = 0,
    fscale: np.ndarray | None = None,
    fbias: np.ndarray | None = None,
    use_vnni: bool | None = None,
) -> np.ndarray:
    """(A - a_zp)(B - b_zp) for A [G, M, K] and B [G, K, N] both activations (attention).

    B is packed per call in one numba pass (column terms included), A in another, and
    one driver call runs every batch entry: three numba launches, whatever G is. The
    launch parameters are memoized per shape.
    """
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"gemm_batched: shapes {a.shape} x {b.shape} do not match")
    if a.dtype not in ACT_SHIFT:
        raise TypeError(f"activations must be uint8 or int8, got {a.dtype}")
    g, m, k = a.shape
    n = b.shape[2]
    out_dtype = np.dtype(out_dtype)
    azp = int(a_zp) + ACT_SHIFT[a.dtype]
    packed, col_term = pack_batched(b, b_zp, azp)
    kp = round_up(max(k, 1), 4)
    rows = _direct_rows(a, kp == k)
    direct = rows is not None
    if direct:  # row sums (if any) by the launch
        buf, rowsum = rows, None
    else:
        buf, _, rowsum, _ = pack_rows(a, packed.has_zero_point)
    key = (g, m, k, n, azp, int(packed.zero_point[0]) if packed.zero_point.size else 0,
           out_dtype.str, int(y_zp), use_vnni, config.kernel_choice(), direct,
           _bytes_key(mult), _bytes_key(fscale), _bytes_key(fbias))
    launch = _ACT_LAUNCHES.get(key)
    if launch is None:
        launch = _gemm_launch(packed, g, m, kp, azp, out_dtype, None, mult, int(y_zp),
                              fscale, fbias, use_vnni, memo=False, direct=direct)
        if len(_ACT_LAUNCHES) > 256:
            _ACT_LAUNCHES.clear()
        _ACT_LAUNCHES[key] = launch
    out = np.empty((g, m, n), out_dtype)
    launch.run_with(buf, out.reshape(-1), rowsum, packed, col_term)
    return out
