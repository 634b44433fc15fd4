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

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from qlinear.runtime.kernels import config
from qlinear.runtime.kernels.config import JIT, JIT_PARALLEL
from qlinear.runtime.kernels.requant import OUT_FLOAT, OUT_INT32, OUT_QUANTIZED
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

    @property
    def step_bytes(self) -> int:
        """Packed bytes of one 64-column panel."""
        return self.taps * self.c4 * TILE_COLS * 4

    @property
    def has_zero_point(self) -> bool:
        return bool(np.any(self.zero_point))


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
    )


def pack_matrix(b: np.ndarray, zero_point: np.ndarray | int = 0) -> PackedWeights:
    """Pack a K x N weight matrix (zero point scalar or per column)."""
    if b.ndim != 2:
        raise ValueError(f"pack_matrix wants a 2-D matrix, got shape {b.shape}")
    return pack_weights(b[None, None], zero_point)


# --------------------------------------------------------------------------- kernels


@njit(inline="always", **JIT)
def _portable_tile(a, row_off, taps, c4, b, b_off, tile, rows):
    """Plain-loop twin of the VNNI tile (same layouts), for CPUs without VNNI and for tests."""
    for i in range(rows * TILE_COLS):
        tile[i] = 0
    step = b_off
    for t in range(taps.shape[0]):
        for q in range(c4):
            for r in range(rows):
                base = row_off[r] + taps[t] + 4 * q
                a0 = np.int32(a[base])
                a1 = np.int32(a[base + 1])
                a2 = np.int32(a[base + 2])
                a3 = np.int32(a[base + 3])
                for j in range(TILE_COLS):
                    p = step + 4 * j
                    s = (a0 * np.int32(b[p]) + a1 * np.int32(b[p + 1])
                         + a2 * np.int32(b[p + 2]) + a3 * np.int32(b[p + 3]))
                    tile[r * TILE_COLS + j] += np.int32(s)
            step += TILE_COLS * 4


@njit(inline="always", **JIT)
def _tile(a, row_off, taps, c4, b, b_off, tile, rows, use_vnni):
    if not use_vnni:
        _portable_tile(a, row_off, taps, c4, b, b_off, tile, rows)
    elif rows == 6:
        vnni_tile_6x64(a, row_off, taps, c4, b, b_off, tile)
    elif rows == 5:
        vnni_tile_5x64(a, row_off, taps, c4, b, b_off, tile)
    elif rows == 4:
        vnni_tile_4x64(a, row_off, taps, c4, b, b_off, tile)
    elif rows == 3:
        vnni_tile_3x64(a, row_off, taps, c4, b, b_off, tile)
    elif rows == 2:
        vnni_tile_2x64(a, row_off, taps, c4, b, b_off, tile)
    else:
        vnni_tile_1x64(a, row_off, taps, c4, b, b_off, tile)


@njit(**JIT_PARALLEL)
def _gemm_tiles(a, row_off, group_stride, taps, c4, bpack, panel_bytes, groups, cols, panels,
                m_total, m_block, col_term, bzp, rowsum, use_rowsum, out_row_off, out_col_stride,
                mode, out_i32, out_q, mult, y_zp, q_lo, q_hi, out_f, fscale, fbias, use_vnni):
    """Every (group, row block, 64-column panel) task in parallel; epilogue from the tile."""
    m_blocks = (m_total + m_block - 1) // m_block
    per_group = m_blocks * panels
    lo = np.float32(q_lo - y_zp)
    hi = np.float32(q_hi - y_zp)
    zp = np.int32(y_zp)
    for task in prange(groups * per_group):
        g = task // per_group
        rem = task - g * per_group
        mb = rem // panels
        panel = rem - mb * panels
        tile = np.empty(MAX_ROWS * TILE_COLS, np.int32)
        offs = np.empty(MAX_ROWS, np.int64)
        b_off = (g * panels + panel) * panel_bytes
        n0 = panel * TILE_COLS
        ncols = min(TILE_COLS, cols - n0)
        m_end = min(m_total, (mb + 1) * m_block)
        for m0 in range(mb * m_block, m_end, MAX_ROWS):
            rows = min(MAX_ROWS, m_end - m0)
            for r in range(rows):
                offs[r] = row_off[m0 + r] + g * group_stride
            _tile(a, offs, taps, c4, bpack, b_off, tile, rows, use_vnni)
            for r in range(rows):
                m = m0 + r
                rs = np.int64(rowsum[g * m_total + m]) if use_rowsum else np.int64(0)
                orow = out_row_off[m]
                for j in range(ncols):
                    gn = g * cols + n0 + j
                    acc64 = np.int64(tile[r * TILE_COLS + j]) + np.int64(col_term[gn])
                    if use_rowsum:
                        acc64 -= np.int64(bzp[gn]) * rs
                    acc = np.int32(acc64)
                    o = orow + gn * out_col_stride
                    if mode == 0:
                        out_i32[o] = acc
                    elif mode == 1:
                        v = np.float32(acc) * mult[gn]
                        v = min(max(v, lo), hi)
                        out_q[o] = np.uint8((np.int32(np.rint(v)) + zp) & 0xFF)
                    else:
                        out_f[o] = np.float32(acc) * fscale[gn] + fbias[gn]


@njit(**JIT_PARALLEL)
def _row_sums(a, row_off, group_stride, taps, width, groups, out):
    """out[g*M + m] = sum of the activations row m of group g reads (real channels only)."""
    m_total = row_off.shape[0]
    for gm in prange(groups * m_total):
        g = gm // m_total
        m = gm - g * m_total
        base = row_off[m] + g * group_stride
        s = np.int64(0)
        for t in range(taps.shape[0]):
            p = base + taps[t]
            for c in range(width):
                s += a[p + c]
        out[gm] = np.int32(s)


@njit(**JIT_PARALLEL)
def _shift_pad_rows(a, shift, kp, out):
    """out[m, :K] = a[m, :] + shift (as uint8), zero padding up to kp columns."""
    m_total, k = a.shape
    for m in prange(m_total):
        for c in range(k):
            out[m * kp + c] = np.uint8((np.int32(a[m, c]) + shift) & 0xFF)
        for c in range(k, kp):
            out[m * kp + c] = 0


# --------------------------------------------------------------------------- wrappers

_EMPTY_I32 = np.zeros(0, np.int32)
_EMPTY_U8 = np.zeros(0, np.uint8)
_EMPTY_F32 = np.zeros(0, np.float32)


def _pick_row_block(m: int, tasks_per_row_block: int) -> int:
    """Row block (multiple of MR): big enough to reuse A, small enough for >= 8 tasks."""
    want_blocks = max(1, -(-8 // max(tasks_per_row_block, 1)))
    block = round_up(max(1, -(-m // want_blocks)), MAX_ROWS)
    return max(MAX_ROWS, min(block, 16 * MAX_ROWS))


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
) -> None:
    """Run the tiled driver over a prepared uint8 activation buffer into `out` (flat).

    `a_zp` is the activation zero point in the uint8 domain of `a` (already shifted).
    `bias` (int32 per column) is added to the accumulator; `fscale`/`fbias` are the
    float epilogue's per-column scale and bias.
    """
    m_total = row_off.shape[0]
    ncols_all = packed.groups * packed.cols
    zpk = np.int64(a_zp)
    col = -zpk * packed.colsum.astype(np.int64) + packed.k * zpk * packed.zero_point
    if bias is not None:
        col = col + np.broadcast_to(np.asarray(bias, np.int64).reshape(-1), (ncols_all,))
    col_term = col.astype(np.int32)  # int32 wrap-around, as ORT's int32 accumulator
    use_rowsum = packed.has_zero_point
    if use_rowsum:
        rowsum = np.empty(packed.groups * m_total, np.int32)
        _row_sums(a, row_off, group_stride, taps, packed.c4 * 4, packed.groups, rowsum)
    else:
        rowsum = _EMPTY_I32
    vnni = config.use_vnni() if use_vnni is None else use_vnni
    m_block = _pick_row_block(m_total, packed.groups * packed.panels)
    out_i32 = out if mode == OUT_INT32 else _EMPTY_I32
    out_q = out.view(np.uint8) if mode == OUT_QUANTIZED else _EMPTY_U8
    out_f = out if mode == OUT_FLOAT else _EMPTY_F32
    if fscale is not None and fbias is None:
        fbias = np.zeros(ncols_all, np.float32)
    _gemm_tiles(
        a, row_off, np.int64(group_stride), taps, np.int64(packed.c4), packed.data,
        np.int64(packed.step_bytes), np.int64(packed.groups), np.int64(packed.cols),
        np.int64(packed.panels), np.int64(m_total), np.int64(m_block), col_term,
        packed.zero_point, rowsum, use_rowsum, out_row_off, np.int64(out_col_stride),
        np.int64(mode), out_i32, out_q,
        mult if mult is not None else _EMPTY_F32, np.int64(y_zp),
        np.int64(q_range[0]), np.int64(q_range[1]), out_f,
        fscale if fscale is not None else _EMPTY_F32,
        fbias if fbias is not None else _EMPTY_F32, bool(vnni),
    )


def prepare_rows(a: np.ndarray) -> tuple[np.ndarray, int, int]:
    """A [M, K] (uint8/int8) as the flat uint8 buffer the kernel reads, its row stride, shift.

    uint8 with K % 4 == 0 is used in place; otherwise rows are shifted into uint8 and
    padded to a multiple of 4 with zeros (padding never enters a sum: weights are 0 there).
    """
    if a.dtype not in ACT_SHIFT:
        raise TypeError(f"activations must be uint8 or int8, got {a.dtype}")
    shift = ACT_SHIFT[a.dtype]
    m, k = a.shape
    kp = round_up(max(k, 1), 4)
    if shift == 0 and kp == k and a.flags.c_contiguous:
        return a.reshape(-1), kp, 0
    buf = np.empty(m * kp, np.uint8)
    _shift_pad_rows(np.ascontiguousarray(a), np.int32(shift), np.int64(kp), buf)
    return buf, kp, shift


def _check(a: np.ndarray, packed: PackedWeights) -> None:
    if a.ndim != 2 or packed.groups != 1 or packed.taps != 1 or a.shape[1] != packed.k:
        raise ValueError(
            f"A {a.shape} does not match packed weights (K={packed.k}, groups={packed.groups})")


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
    buf, kp, shift = prepare_rows(a)
    row_off = np.arange(m, dtype=np.int64) * kp
    taps = np.zeros(1, np.int64)
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
    info = np.iinfo(out_dtype) if mode == OUT_QUANTIZED else np.iinfo(np.uint8)
    run_packed(
        buf, row_off, 0, taps, int(a_zp) + shift, packed, mode=mode, out=out.reshape(-1),
        out_row_off=np.arange(m, dtype=np.int64) * n, out_col_stride=1, bias=bias,
        mult=None if mult is None else np.ascontiguousarray(mult, np.float32),
        y_zp=int(y_zp), q_range=(int(info.min), int(info.max)),
        fscale=None if fscale is None else np.ascontiguousarray(fscale, np.float32),
        fbias=None if fbias is None else np.ascontiguousarray(fbias, np.float32),
        use_vnni=use_vnni,
    )
    return out
