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
register tile (no int32 tensor is materialised for the last two).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from qlinear.runtime.kernels import config
from qlinear.runtime.kernels.config import JIT
from qlinear.runtime.kernels.parallel import claim, finish, run_tasks
from qlinear.runtime.kernels.requant import (
    OUT_FLOAT,
    OUT_INT32,
    OUT_QUANTIZED,
    requantize_value,
)
from qlinear.runtime.kernels.vnni import (
    MAX_ROWS,
    TILE_COLS,
    vnni_tile_1x64,
    vnni_tile_2x64,
    vnni_tile_3x64,
    vnni_tile_4x64,
    vnni_tile_5x64,
    vnni_tile_6x64,
)

ACT_SHIFT = {np.dtype(np.uint8): 0, np.dtype(np.int8): 128}


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
    """Plain-loop twin of the VNNI tile (same layouts), for CPUs without VNNI and for tests."""
    for i in range(rows * TILE_COLS):
        tile[i] = 0
    step = b_off
    for t in range(taps.shape[0]):
        for q in range(c4):
            for r in range(rows):
                base = row_off[r] + taps[t] + a_step * q
                a0 = np.int32(a[base])
                a1 = np.int32(a[base + 1])
                a2 = np.int32(a[base + 2])
                a3 = np.int32(a[base + 3])
                for j in range(TILE_COLS):
                    p = step + 4 * j
                    s = (
                        a0 * np.int32(b[p])
                        + a1 * np.int32(b[p + 1])
                        + a2 * np.int32(b[p + 2])
                        + a3 * np.int32(b[p + 3])
                    )
                    tile[r * TILE_COLS + j] += np.int32(s)
            step += TILE_COLS * 4


@njit(inline="always", **JIT)
def _tile(a, row_off, taps, c4, a_step, b, b_off, tile, rows, use_vnni):
    if not use_vnni:
        _portable_tile(a, row_off, taps, c4, a_step, b, b_off, tile, rows)
    elif rows == 6:
        vnni_tile_6x64(a, row_off, taps, c4, a_step, b, b_off, tile)
    elif rows == 5:
        vnni_tile_5x64(a, row_off, taps, c4, a_step, b, b_off, tile)
    elif rows == 4:
        vnni_tile_4x64(a, row_off, taps, c4, a_step, b, b_off, tile)
    elif rows == 3:
        vnni_tile_3x64(a, row_off, taps, c4, a_step, b, b_off, tile)
    elif rows == 2:
        vnni_tile_2x64(a, row_off, taps, c4, a_step, b, b_off, tile)
    else:
        vnni_tile_1x64(a, row_off, taps, c4, a_step, b, b_off, tile)


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
):
    """Zero-point corrections in place on the int32 tile, then int32/8-bit/float stores.

    Loops index slices with plain range variables (no negative-index fix-ups), so LLVM
    vectorizes them; int32 arithmetic wraps exactly like ORT's int32 accumulator.
    """
    colt = col_term[n0 : n0 + ncols]
    for r in range(rows):
        t = tile[r * TILE_COLS : r * TILE_COLS + ncols]
        if use_rowsum:
            rs = rowsum[rs0 + m0 + r]
            bz = bzp[n0 : n0 + ncols]
            for j in range(ncols):
                t[j] = np.int32(t[j] + colt[j] - bz[j] * rs)
        else:
            for j in range(ncols):
                t[j] = np.int32(t[j] + colt[j])
    if out_col_stride == 1:
        for r in range(rows):
            t = tile[r * TILE_COLS : r * TILE_COLS + ncols]
            o = out_row_off[m0 + r] + n0
            if mode == 0:
                oi = out_i32[o : o + ncols]
                for j in range(ncols):
                    oi[j] = t[j]
            elif mode == 1:
                oq = out_q[o : o + ncols]
                ml = mult[n0 : n0 + ncols]
                for j in range(ncols):
                    oq[j] = np.uint8(requantize_value(t[j], ml[j], zp, lo, hi) & 0xFF)
            else:
                of = out_f[o : o + ncols]
                fs = fscale[n0 : n0 + ncols]
                fb = fbias[n0 : n0 + ncols]
                for j in range(ncols):
                    of[j] = np.float32(t[j]) * fs[j] + fb[j]
    else:
        for j in range(ncols):
            n = n0 + j
            o = n * out_col_stride
            if mode == 0:
                for r in range(rows):
                    out_i32[out_row_off[m0 + r] + o] = tile[r * TILE_COLS + j]
            elif mode == 1:
                ml = mult[n]
                for r in range(rows):
                    q = requantize_value(tile[r * TILE_COLS + j], ml, zp, lo, hi)
                    out_q[out_row_off[m0 + r] + o] = np.uint8(q & 0xFF)
            else:
                fs = fscale[n]
                fb = fbias[n]
                for r in range(rows):
                    out_f[out_row_off[m0 + r] + o] = np.float32(tile[r * TILE_COLS + j]) * fs + fb


@njit(**JIT)
def _gemm_tiles(
    counters,
    a,
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
    rowsum,
    use_rowsum,
    out_row_off,
    out_col_stride,
    mode,
    out_i32,
    out_q,
    mult,
    y_zp,
    q_lo,
    q_hi,
    out_f,
    fscale,
    fbias,
    use_vnni,
):
    """Claims (group, row block, 64-column panel) tasks; epilogue straight from the tile."""
    m_blocks = (m_total + m_block - 1) // m_block
    per_group = m_blocks * panels
    ntasks = groups * per_group
    pg_size = max(1, min(panels, (256 * 1024) // panel_bytes))
    lo = np.float32(q_lo - y_zp)
    hi = np.float32(q_hi - y_zp)
    zp = np.int32(y_zp)
    tile = np.empty(MAX_ROWS * TILE_COLS, np.int32)
    offs = np.empty(MAX_ROWS, np.int64)
    while True:
        task = claim(counters)
        if task >= ntasks:
            break
        g = task // per_group
        rem = task - g * per_group
        # panels go in groups of ~256 KB of weights; inside a group, row blocks outer and
        # panels inner: the group stays in L2 while every row block streams past it
        pgi = rem // (m_blocks * pg_size)
        cnt = min(pg_size, panels - pgi * pg_size)
        local = rem - pgi * pg_size * m_blocks
        mb = local // cnt
        panel = pgi * pg_size + (local - mb * cnt)
        b_off = (g * panels + panel) * panel_bytes
        n0 = panel * TILE_COLS
        ncols = min(TILE_COLS, cols - n0)
        m_end = min(m_total, (mb + 1) * m_block)
        for m0 in range(mb * m_block, m_end, MAX_ROWS):
            rows = min(MAX_ROWS, m_end - m0)
            for r in range(rows):
                offs[r] = row_off[m0 + r] + g * group_stride
            _tile(a, offs, taps, c4, a_step, bpack, b_off, tile, rows, use_vnni)
            _epilogue(
                tile,
                rows,
                ncols,
                m0,
                g * cols + n0,
                g * m_total,
                col_term,
                bzp,
                rowsum,
                use_rowsum,
                out_row_off,
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
            )
        finish(counters)


@njit(**JIT)
def _row_sums(a, row_off, group_stride, taps, width, groups, out):
    """out[g*M + m] = sum of the activations row m of group g reads (real channels only)."""
    m_total = row_off.shape[0]
    for gm in range(groups * m_total):
        g = gm // m_total
        m = gm - g * m_total
        base = row_off[m] + g * group_stride
        s = np.int64(0)
        for t in range(taps.shape[0]):
            p = base + taps[t]
            for c in range(width):
                s += a[p + c]
        out[gm] = np.int32(s)


@njit(**JIT)
def _pack_row_tiles(counters, a, flip, out, rowsum):
    """out[tile][q][r] = a[tile*MR + r, q] ^ flip, on 4-byte words; row sums of the bytes.

    `a` is A viewed as uint32 words [M, K/4] (K padded to 4 with zeros); flip
    0x80808080 adds 128 to every byte mod 256 (int8 -> uint8). Rows past M are zero.
    One task = 8 tiles.
    """
    m_total, k4 = a.shape
    tiles = out.shape[0] // (MAX_ROWS * k4)
    want = rowsum.shape[0] > 0
    ntasks = (tiles + 7) // 8
    while True:
        task = claim(counters)
        if task >= ntasks:
            break
        for t in range(task * 8, min(tiles, task * 8 + 8)):
            base = t * k4 * MAX_ROWS
            for r in range(MAX_ROWS):
                m = t * MAX_ROWS + r
                if m < m_total:
                    s = np.uint32(0)
                    for q in range(k4):
                        w = a[m, q] ^ flip
                        out[base + q * MAX_ROWS + r] = w
                        if want:
                            s += (w & np.uint32(0xFF)) + ((w >> np.uint32(8)) & np.uint32(0xFF))
                            s += ((w >> np.uint32(16)) & np.uint32(0xFF)) + (w >> np.uint32(24))
                    if want:
                        rowsum[m] = np.int32(s)
                else:
                    for q in range(k4):
                        out[base + q * MAX_ROWS + r] = np.uint32(0)
        finish(counters)


# --------------------------------------------------------------------------- wrappers

_EMPTY_I32 = np.zeros(0, np.int32)
_EMPTY_U8 = np.zeros(0, np.uint8)
_EMPTY_F32 = np.zeros(0, np.float32)


def _pick_row_block(m: int, tasks_per_row_block: int) -> int:
    """Row block (multiple of MR): >= 16 tasks and at most 48 rows, so the last task a
    thread claims is short (the caller waits for it) while A still stays in L1/L2."""
    want_blocks = max(1, -(-16 // max(tasks_per_row_block, 1)))
    block = round_up(max(1, -(-m // want_blocks)), MAX_ROWS)
    return max(MAX_ROWS, min(block, 8 * MAX_ROWS))


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
) -> None:
    """Run the tiled driver over a prepared uint8 activation buffer into `out` (flat).

    `a_zp` is the activation zero point in the uint8 domain of `a` (already shifted).
    `bias` (int32 per column) is added to the accumulator; `fscale`/`fbias` are the
    float epilogue's per-column scale and bias. `a_step` is the byte distance between
    consecutive 4-byte groups of one row (4 unpacked, 4*MR for A packed in tiles);
    `rowsum` may be given when the packing already computed it.
    """
    m_total = row_off.shape[0]
    ncols_all = packed.groups * packed.cols
    col_term = packed.column_term(int(a_zp), None if bias is None else np.asarray(bias))
    use_rowsum = packed.has_zero_point
    if not use_rowsum:
        rowsum = _EMPTY_I32
    elif rowsum is None:
        if a_step != 4:
            raise ValueError("row sums of tile-packed activations must come from the packing")
        rowsum = np.empty(packed.groups * m_total, np.int32)
        _row_sums(a, row_off, group_stride, taps, packed.c4 * 4, packed.groups, rowsum)
    vnni = config.use_vnni() if use_vnni is None else use_vnni
    m_block = _pick_row_block(m_total, packed.groups * packed.panels)
    out_i32 = out if mode == OUT_INT32 else _EMPTY_I32
    out_q = out.view(np.uint8) if mode == OUT_QUANTIZED else _EMPTY_U8
    out_f = out if mode == OUT_FLOAT else _EMPTY_F32
    if fscale is not None and fbias is None:
        fbias = np.zeros(ncols_all, np.float32)
    m_blocks = -(-m_total // m_block)
    ntasks = packed.groups * packed.panels * m_blocks
    # streaming the packed weights costs too (M=1 heads are memory-bound)
    work = m_total * ncols_all * packed.k + packed.data.size * 4
    run_tasks(
        _gemm_tiles,
        ntasks,
        work,
        a,
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
        col_term,
        packed.zero_point,
        rowsum,
        use_rowsum,
        out_row_off,
        np.int64(out_col_stride),
        np.int64(mode),
        out_i32,
        out_q,
        mult if mult is not None else _EMPTY_F32,
        np.int64(y_zp),
        np.int64(q_range[0]),
        np.int64(q_range[1]),
        out_f,
        fscale if fscale is not None else _EMPTY_F32,
        fbias if fbias is not None else _EMPTY_F32,
        bool(vnni),
    )


def pack_rows(
    a: np.ndarray, want_rowsum: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """A [M, K] (uint8/int8) packed per call into MR-row tiles [M/MR][K4][MR][4] (uint8).

    One contiguous stream per tile keeps the micro-kernel's broadcasts in cache lines
    the prefetcher already fetched. int8 is shifted by +128 on the way, K is padded
    with zeros (weights are 0 there too) and row sums come out of the same pass.
    Returns (buffer, row offsets, row sums or None, shift).
    """
    if a.dtype not in ACT_SHIFT:
        raise TypeError(f"activations must be uint8 or int8, got {a.dtype}")
    shift = ACT_SHIFT[a.dtype]
    m, k = a.shape
    kp = round_up(max(k, 1), 4)
    mp = round_up(max(m, 1), MAX_ROWS)
    a8 = np.ascontiguousarray(a).view(np.uint8)
    if kp != k:
        a8 = np.pad(a8, ((0, 0), (0, kp - k)), constant_values=0x80 if shift else 0)
    buf = np.empty(mp * kp, np.uint8)
    rowsum = np.empty(m if want_rowsum else 0, np.int32)
    flip = np.uint32(0x80808080 if shift else 0)
    tiles = mp // MAX_ROWS
    run_tasks(
        _pack_row_tiles,
        -(-tiles // 8),
        m * kp * 32,
        a8.view(np.uint32),
        flip,
        buf.view(np.uint32),
        rowsum,
    )
    return buf, _tile_row_offsets(m, kp), (rowsum if want_rowsum else None), shift


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


def _check(a: np.ndarray, packed: PackedWeights) -> None:
    if a.ndim != 2 or packed.groups != 1 or packed.taps != 1 or a.shape[1] != packed.k:
        raise ValueError(
            f"A {a.shape} does not match packed weights (K={packed.k}, groups={packed.groups})"
        )


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
) -> np.ndarray:
    """(A - a_zp)(B - b_zp) for A [M, K] uint8/int8 and packed B, into out_dtype [M, N].

    out_dtype int32: the exact accumulator (+ int32 bias). uint8/int8: requantized with
    per-column `mult` and `y_zp`. float32: acc * fscale[n] + fbias[n].
    """
    _check(a, packed)
    m = a.shape[0]
    n = packed.cols
    buf, row_off, rowsum, shift = pack_rows(a, packed.has_zero_point)
    taps = _TAP0
    out_dtype = np.dtype(out_dtype)
    out = np.empty((m, n), out_dtype)
    if out_dtype == np.int32:
        mode = OUT_INT32
    elif out_dtype == np.float32:
        mode = OUT_FLOAT
        if fscale is None:
            raise ValueError("float output needs fscale")
    elif out_dtype in (np.uint8, np.int8):
        mode = OUT_QUANTIZED
        if mult is None:
            raise ValueError("quantized output needs mult")
    else:
        raise TypeError(f"unsupported output dtype {out_dtype}")
    run_packed(
        buf,
        row_off,
        0,
        taps,
        int(a_zp) + shift,
        packed,
        mode=mode,
        out=out.reshape(-1),
        out_row_off=_strided_offsets(m, n),
        out_col_stride=1,
        bias=bias,
        mult=None if mult is None else np.ascontiguousarray(mult, np.float32),
        y_zp=int(y_zp),
        q_range=_Q_RANGE.get(out_dtype, (0, 255)),
        fscale=None if fscale is None else np.ascontiguousarray(fscale, np.float32),
        fbias=None if fbias is None else np.ascontiguousarray(fbias, np.float32),
        use_vnni=use_vnni,
        a_step=4 * MAX_ROWS,
        rowsum=rowsum,
    )
    return out
