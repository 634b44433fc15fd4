"""Single-pass numba kernels for the quantized elementwise ops between the GEMMs.

numpy needs 4-6 passes (and temporaries) for a quantize, a QLinearAdd or a requantized
QLinearMul; these loops read each input once and write the output once. Every kernel
does the *same float32 operations in the same order* as the numpy definition it
replaces (`qlinear.quant.affine`, the QLinearAdd/QLinearMul formulas in
`ops/contrib_qlinear.py`), with no fastmath, so results are bit-identical:

- rint-then-saturate equals saturate-then-rint because the bounds are integers, and
  after clamping |v| < 2^22 so the magic-number add/subtract is exactly rint;
- NaN quantizes to qmin (``fmax`` semantics of the reference).

Kernels take `counters` first and claim chunks of work (`parallel.run_tasks`), so
large tensors share the int8 GEMM pool and small ones run on the calling thread
without ever waiting on a barrier.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit

from qlinear.runtime.kernels.config import JIT
from qlinear.runtime.kernels.lookup import lookup_bytes
from qlinear.runtime.kernels.parallel import claim, finish, run_tasks, unrecorded
from qlinear.runtime.kernels.requant import ROUNDING_MAGIC, requantize_value
from qlinear.runtime.kernels.transpose import span_task

#: Elements per claimed task: large enough that the atomic claim is noise.
CHUNK = 1 << 15
#: Estimated work units (multiply-add equivalents) per element, for run_tasks' threshold.
#: At 32 (as the byte kernels), a tensor of 64K elements and up splits over both threads:
#: a same-shape [1,56,56,64] QLinearAdd went from 45 to 25 us. (With the earlier
#: Python-thread pool, splitting BERT-sized tensors had doubled their time; the native
#: pool joins within microseconds.)
ELEMENT_WORK = 32

_U = np.uint64  # unsigned offsets: no negative-index fix-ups, loops vectorize


def _tasks(n: int) -> int:
    return max(1, -(-n // CHUNK))


# ----------------------------------------------------------------- quantize / dequantize


@njit(**JIT)
def _quantize_f32(counters, x, scale, zp, inner, qmin, qmax, out):  # pragma: no cover
    n = x.size
    nch = scale.size
    ntasks = (n + CHUNK - 1) // CHUNK
    while True:
        t = claim(counters)
        if t >= ntasks:
            break
        i = t * CHUNK
        end = min(n, i + CHUNK)
        while i < end:
            blk = i // inner
            c = blk % nch
            seg = min(end, (blk + 1) * inner)
            # slices: loops from 0 vectorize, range(i, seg) did not
            quantize_row(x[i:seg], scale[c], zp[c], qmin, qmax, out[i:seg])
            i = seg
        finish(counters)


@njit(inline="always", **JIT)
def quantize_row(xs, s, zp, qmin, qmax, os):  # pragma: no cover
    """os = saturate(rint(xs / s) + zp): the one float -> 8/16-bit quantization loop."""
    z, lo, hi = quantize_bounds(zp, qmin, qmax)
    for k in range(xs.size):
        os[k] = quantize_value(xs[k], s, z, lo, hi)


@njit(inline="always", **JIT)
def quantize_bounds(zp, qmin, qmax):  # pragma: no cover
    """(int32 zp, float32 qmin - zp, float32 qmax - zp): what `quantize_value` takes,
    computed once per row, not per element."""
    return np.int32(zp), np.float32(qmin - zp), np.float32(qmax - zp)


@njit(inline="always", **JIT)
def quantize_value(x, s, z, lo, hi):  # pragma: no cover
    """saturate(rint(x / s)) + z for one float32: the arithmetic of every quantize loop
    (kernels whose loops are not plain rows, e.g. `quantize_channels_last`, call it)."""
    v = x / s
    if not v >= lo:  # also NaN -> qmin
        v = lo
    if v > hi:
        v = hi
    r = (v + ROUNDING_MAGIC) - ROUNDING_MAGIC
    return np.int32(r) + z


@njit(**JIT)
def _dequantize(counters, q, scale, zp, inner, out):  # pragma: no cover
    n = q.size
    nch = scale.size
    ntasks = (n + CHUNK - 1) // CHUNK
    while True:
        t = claim(counters)
        if t >= ntasks:
            break
        i = t * CHUNK
        end = min(n, i + CHUNK)
        while i < end:
            blk = i // inner
            c = blk % nch
            seg = min(end, (blk + 1) * inner)
            dequantize_row(q[i:seg], scale[c], np.float32(zp[c]), out[i:seg])
            i = seg
        finish(counters)


@njit(inline="always", **JIT)
def dequantize_row(qs, s, zf, os):  # pragma: no cover
    """os = (float32(qs) - zf) * s: the one 8/16-bit -> float dequantization loop."""
    for k in range(qs.size):
        os[k] = (np.float32(qs[k]) - zf) * s


def quantize_f32(
    x: np.ndarray, scale: np.ndarray, zp: np.ndarray, inner: int, qmin: int, qmax: int,
    dtype: np.dtype,
) -> np.ndarray:
    """saturate(rint(x / scale[c]) + zp[c]) for float32 x, c = (flat index // inner) % C.

    Per-tensor: C = 1. Per-axis: C = x.shape[axis], inner = prod(x.shape[axis+1:]).
    Bit-identical to `quantize_affine` for 8/16-bit integer outputs.
    """
    xf = np.ascontiguousarray(x).reshape(-1)
    out = np.empty(x.shape, dtype)
    _run(_quantize_f32, xf.size, xf, scale, zp, np.int64(max(inner, 1)), np.int64(qmin),
         np.int64(qmax), out.reshape(-1))
    return out


def dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, inner: int) -> np.ndarray:
    """(float32(q) - zp[c]) * scale[c] in float32; bit-identical to `dequantize_affine`."""
    qf = np.ascontiguousarray(q).reshape(-1)
    out = np.empty(q.shape, np.float32)
    _run(_dequantize, qf.size, qf, scale, zp, np.int64(max(inner, 1)), out.reshape(-1))
    return out


def _run(kernel, n: int, *args) -> None:
    run_tasks(kernel, _tasks(n), n * ELEMENT_WORK, *args)


# ----------------------------------------------------------------- quantize to channels last

#: Elements (all channels) per claimed task of `quantize_channels_last`: 12 KiB of
#: output, 13 tasks for one 224x224 RGB image (so two threads stay balanced), and the
#: one-plane row of the scattering path stays in L1 between its two loops.
CL_TASK_ELEMENTS = 12288
#: Work units per element: a quantize plus a scattered byte store (transpose.py counts
#: 32 for the scatter alone). One 224x224 RGB image then splits over the threads.
CL_ELEMENT_WORK = 32


@njit(**JIT)
def _quantize_interleaved(counters, x, s, zp, qmin, qmax, span, out):  # pragma: no cover
    """1, 3 or 4 channels: one loop with a strided store per channel, which LLVM
    vectorizes (whole-vector divides of each plane, then byte shuffles); for 3 channels
    10% faster than quantizing rows and then interleaving them."""
    nb, c_n, size = x.shape
    per_image = (size + span - 1) // span
    z, lo, hi = quantize_bounds(zp, qmin, qmax)
    while True:
        t = claim(counters)
        if t >= nb * per_image:
            break
        b, p0, p1 = span_task(t, per_image, span, size)
        n = p1 - p0
        dst = out[b, p0 * c_n : p1 * c_n]
        if c_n == 1:  # the same bytes in both layouts
            quantize_row(x[b, 0, p0:p1], s, zp, qmin, qmax, dst)
        elif c_n == 3:
            x0 = x[b, 0, p0:p1]
            x1 = x[b, 1, p0:p1]
            x2 = x[b, 2, p0:p1]
            for k in range(n):
                dst[3 * k] = quantize_value(x0[k], s, z, lo, hi)
                dst[3 * k + 1] = quantize_value(x1[k], s, z, lo, hi)
                dst[3 * k + 2] = quantize_value(x2[k], s, z, lo, hi)
        else:
            x0 = x[b, 0, p0:p1]
            x1 = x[b, 1, p0:p1]
            x2 = x[b, 2, p0:p1]
            x3 = x[b, 3, p0:p1]
            for k in range(n):
                dst[4 * k] = quantize_value(x0[k], s, z, lo, hi)
                dst[4 * k + 1] = quantize_value(x1[k], s, z, lo, hi)
                dst[4 * k + 2] = quantize_value(x2[k], s, z, lo, hi)
                dst[4 * k + 3] = quantize_value(x3[k], s, z, lo, hi)
        finish(counters)


@njit(**JIT)
def _quantize_scattered(counters, x, s, zp, qmin, qmax, span, out):  # pragma: no cover
    """Any channel count: each plane's span quantized into an L1 row (vectorized), then
    scattered into the interleaved output, as `transpose.channels_last_small` moves
    bytes. A strided quantize loop would divide one element at a time."""
    nb, c_n, size = x.shape
    per_image = (size + span - 1) // span
    row = np.empty(span, out.dtype)
    while True:
        t = claim(counters)
        if t >= nb * per_image:
            break
        b, p0, p1 = span_task(t, per_image, span, size)
        n = p1 - p0
        dst = out[b, p0 * c_n : p1 * c_n]
        for c in range(c_n):
            quantize_row(x[b, c, p0:p1], s, zp, qmin, qmax, row[:n])
            for k in range(n):
                dst[k * c_n + c] = row[k]
        finish(counters)


def quantize_channels_last(
    x: np.ndarray, scale: np.float32, zp: int | np.integer, qmin: int, qmax: int,
    dtype: np.dtype,
) -> np.ndarray:
    """[B, C, *spatial] float32 -> [B, *spatial, C] quantized per tensor, in one pass.

    The network input of an NHWC CNN is quantized and then moved channels last; this
    writes the interleaved bytes directly (no 8-bit NCHW tensor written and read back).
    Bit-identical to `quantize_f32` then a transpose: the same `quantize_value`. The
    zero point goes in as the output type: with an int32 one LLVM adds it in 32 bits
    before narrowing (36 instead of 23 us for a 224x224 RGB image).
    """
    b, c = x.shape[:2]
    size = math.prod(x.shape[2:])  # np.prod of a tuple costs 3 us, the whole 1-pixel call
    out = np.empty((b, size * c), dtype)
    if out.size:
        span = max(64, CL_TASK_ELEMENTS // c // 64 * 64)  # tasks write multiples of 64 B
        kernel = _quantize_interleaved if c in (1, 3, 4) else _quantize_scattered
        run_tasks(kernel, b * -(-size // span), out.size * CL_ELEMENT_WORK,
                  np.ascontiguousarray(x).reshape(b, c, size), np.float32(scale),
                  out.dtype.type(zp), int(qmin), int(qmax), span, out)
    return out.reshape((b, *x.shape[2:], c))


# ----------------------------------------------------------------- binary, broadcast


def collapse_broadcast(
    a_shape: tuple[int, ...], b_shape: tuple[int, ...]
) -> tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]] | None:
    """(out dims, a strides, b strides) of a 3-D view covering the broadcast, or None.

    Strides are in elements of the contiguous operands, 0 along broadcast dims. Adjacent
    dims where both operands are full (or both broadcast the same way) merge, so same
    shape, scalar, per-last-dim and per-channel (C,1,1) all fit in three dims.
    """
    nd = max(len(a_shape), len(b_shape))
    a = (1,) * (nd - len(a_shape)) + tuple(a_shape)
    b = (1,) * (nd - len(b_shape)) + tuple(b_shape)
    dims: list[list[int]] = []  # [size, a_full, b_full]
    for da, db in zip(a, b, strict=True):
        if da != db and da != 1 and db != 1:
            return None
        size = max(da, db)
        if size == 1:
            continue
        pat = [size, int(da == size), int(db == size)]
        if dims and dims[-1][1:] == pat[1:]:
            dims[-1][0] *= size
        else:
            dims.append(pat)
    if len(dims) > 3:
        return None
    while len(dims) < 3:
        dims.insert(0, [1, 1, 1])
    sizes = tuple(d[0] for d in dims)

    def strides(col: int) -> tuple[int, int, int]:
        out = [0, 0, 0]
        step = 1
        for i in (2, 1, 0):
            if dims[i][col]:
                out[i] = step
                step *= dims[i][0]
        return out[0], out[1], out[2]

    return sizes, strides(1), strides(2)  # type: ignore[return-value]


@njit(inline="always", **JIT)
def _add_value(av, bv, r_a, r_b, fixed, lo, hi):  # pragma: no cover
    y = np.float32(av) * r_a + (np.float32(bv) * r_b + fixed)
    if y < lo:
        y = lo
    if y > hi:
        y = hi
    return np.int32((y + ROUNDING_MAGIC) - ROUNDING_MAGIC)


@njit(**JIT)
def _qadd3(counters, a, sa, b, sb, dims, r_a, r_b, fixed, lo, hi, out):  # pragma: no cover
    """Rows of d2 elements by flat unsigned offsets: slicing a view per row cost ~60 ns,
    4x the arithmetic of a 128-element row (BERT's [1,12,128,128] mask add: 113 -> 24 us)."""
    d0, d1, d2 = dims[0], dims[1], dims[2]
    rows = d0 * d1
    per = max(1, CHUNK // max(d2, 1))
    ntasks = (rows + per - 1) // per
    ud2 = _U(d2)
    while True:
        t = claim(counters)
        if t >= ntasks:
            break
        for row in range(t * per, min(rows, (t + 1) * per)):
            i0 = row // d1
            i1 = row - i0 * d1
            ao = _U(i0 * sa[0] + i1 * sa[1])
            bo = _U(i0 * sb[0] + i1 * sb[1])
            oo = _U(row * d2)
            if sa[2] == 1 and sb[2] == 1:
                for k in range(ud2):
                    out[oo + k] = _add_value(a[ao + k], b[bo + k], r_a, r_b, fixed, lo, hi)
            elif sa[2] == 1:
                bv = b[bo]
                for k in range(ud2):
                    out[oo + k] = _add_value(a[ao + k], bv, r_a, r_b, fixed, lo, hi)
            elif sb[2] == 1:
                av = a[ao]
                for k in range(ud2):
                    out[oo + k] = _add_value(av, b[bo + k], r_a, r_b, fixed, lo, hi)
            else:
                v = _add_value(a[ao], b[bo], r_a, r_b, fixed, lo, hi)
                for k in range(ud2):
                    out[oo + k] = v
        finish(counters)


@njit(**JIT)
def _qmul3(counters, a, sa, b, sb, dims, za, zb, mult, zc, lo, hi, out):  # pragma: no cover
    """As `_qadd3`: flat unsigned offsets, no per-row views."""
    d0, d1, d2 = dims[0], dims[1], dims[2]
    rows = d0 * d1
    per = max(1, CHUNK // max(d2, 1))
    ntasks = (rows + per - 1) // per
    ud2 = _U(d2)
    while True:
        t = claim(counters)
        if t >= ntasks:
            break
        for row in range(t * per, min(rows, (t + 1) * per)):
            i0 = row // d1
            i1 = row - i0 * d1
            ao = _U(i0 * sa[0] + i1 * sa[1])
            bo = _U(i0 * sb[0] + i1 * sb[1])
            oo = _U(row * d2)
            if sa[2] == 1 and sb[2] == 1:
                for k in range(ud2):
                    acc = (np.int32(a[ao + k]) - za) * (np.int32(b[bo + k]) - zb)
                    out[oo + k] = requantize_value(acc, mult, zc, lo, hi)
            elif sa[2] == 1:
                bv = np.int32(b[bo]) - zb
                for k in range(ud2):
                    acc = (np.int32(a[ao + k]) - za) * bv
                    out[oo + k] = requantize_value(acc, mult, zc, lo, hi)
            elif sb[2] == 1:
                av = np.int32(a[ao]) - za
                for k in range(ud2):
                    acc = av * (np.int32(b[bo + k]) - zb)
                    out[oo + k] = requantize_value(acc, mult, zc, lo, hi)
            else:
                acc = (np.int32(a[ao]) - za) * (np.int32(b[bo]) - zb)
                v = requantize_value(acc, mult, zc, lo, hi)
                for k in range(ud2):
                    out[oo + k] = v
        finish(counters)


class BinaryPlan(NamedTuple):
    """Everything a broadcast binary kernel needs that depends only on the two shapes."""

    dims: np.ndarray  # int64[3]
    a_strides: np.ndarray  # int64[3], 0 along broadcast dims
    b_strides: np.ndarray
    out_shape: tuple[int, ...]
    ntasks: int
    work: int


def _split_rows(n: int, sa: int, sb: int) -> tuple[tuple[int, int, int], tuple, tuple]:
    """A flat [n] operation as [n // k, k] rows (k the largest divisor of n up to CHUNK,
    at least CHUNK // 8), so a same-shape add splits into tasks; else kept flat."""
    for k in range(CHUNK, CHUNK // 8 - 1, -1):
        if n % k == 0:
            return (1, n // k, k), (0, k * sa, sa), (0, k * sb, sb)
    return (1, 1, n), (0, 0, sa), (0, 0, sb)


def plan_binary(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> BinaryPlan | None:
    """The 3-D broadcast plan for these shapes, or None (numpy handles the rest)."""
    collapsed = collapse_broadcast(a_shape, b_shape)
    if collapsed is None:
        return None
    dims, sa, sb = collapsed
    if dims[0] == dims[1] == 1 and dims[2] > CHUNK:
        dims, sa, sb = _split_rows(dims[2], sa[2], sb[2])
    rows = dims[0] * dims[1]
    per = max(1, CHUNK // max(dims[2], 1))
    out_shape = tuple(np.broadcast_shapes(a_shape, b_shape))
    size = int(np.prod(out_shape)) if out_shape else 1
    return BinaryPlan(np.array(dims, np.int64), np.array(sa, np.int64), np.array(sb, np.int64),
                      out_shape, -(-rows // per), size * ELEMENT_WORK)


def qlinear_add(
    a: np.ndarray, b: np.ndarray, plan: BinaryPlan, r_a: np.float32, r_b: np.float32,
    fixed: np.float32, dtype: np.dtype,
) -> np.ndarray:
    """saturate(rint(a*r_a + (b*r_b + fixed))) in float32 (MLAS qladd), broadcast by `plan`."""
    info = np.iinfo(dtype)
    out = np.empty(plan.out_shape, dtype)
    run_tasks(_qadd3, plan.ntasks, plan.work, np.ascontiguousarray(a).reshape(-1),
              plan.a_strides, np.ascontiguousarray(b).reshape(-1), plan.b_strides, plan.dims,
              np.float32(r_a), np.float32(r_b), np.float32(fixed), np.float32(info.min),
              np.float32(info.max), out.reshape(-1))
    return out


def qlinear_mul(
    a: np.ndarray, b: np.ndarray, plan: BinaryPlan, za: int, zb: int, mult: np.float32, zc: int,
    dtype: np.dtype,
) -> np.ndarray:
    """requantize((a - za)(b - zb), mult, zc): the shared requantize arithmetic, one pass."""
    info = np.iinfo(dtype)
    out = np.empty(plan.out_shape, dtype)
    run_tasks(_qmul3, plan.ntasks, plan.work, np.ascontiguousarray(a).reshape(-1),
              plan.a_strides, np.ascontiguousarray(b).reshape(-1), plan.b_strides, plan.dims,
              np.int32(za), np.int32(zb), np.float32(mult), np.int32(zc),
              np.float32(info.min - zc), np.float32(info.max - zc), out.reshape(-1))
    return out


# ----------------------------------------------------------------- table lookup


@njit(**JIT)
def _lookup(x, table, out):  # pragma: no cover
    for i in range(x.size):
        out[i] = table[x[i]]


@njit(**JIT)
def _index_range(idx):  # pragma: no cover
    lo = idx[0]
    hi = idx[0]
    for i in range(idx.size):
        lo = min(lo, idx[i])
        hi = max(hi, idx[i])
    return lo, hi


@njit(**JIT)
def _lookup_wrapped(x, table, out):  # pragma: no cover
    n = table.size
    for i in range(x.size):
        j = x[i]
        out[i] = table[j + n if j < 0 else j]


#: Below this many bytes the plain loop (~0.3 ns a byte) beats lookup_bytes' ~2 us more
#: fixed cost (kernel choice from the environment, run_tasks): measured equal at 8 KiB.
SMALL_LOOKUP = 8192


def _lookup_256(x: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    """out = table[x] for flat uint8 x, table >= 256 entries: an int8/uint8 table goes to
    `lookup.lookup_bytes` (SIMD, both cores), any other, or a small x, to the plain loop."""
    if x.size >= SMALL_LOOKUP and table.dtype.itemsize == 1 and table.dtype.kind in "iu":
        lookup_bytes(x, np.ascontiguousarray(table[:256]), out)
    else:
        _lookup(x, table, out)


def lookup_u8(x: np.ndarray, table_by_bits: np.ndarray) -> np.ndarray:
    """out[i] = table[bit pattern of x[i]] for 8-bit x (the table is indexed by uint8 bits)."""
    xf = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    out = np.empty(x.shape, table_by_bits.dtype)
    _lookup_256(xf, table_by_bits, out.reshape(-1))
    return out


def gather_1d(table: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """table[indices] for a 1-D table (ONNX Gather axis 0): negative indices count from
    the end, an index out of range raises IndexError naming it. One pass for 8-bit
    indices into a 256-entry table (always in range), else a range check and a pass.
    """
    flat = np.ascontiguousarray(indices).reshape(-1)
    out = np.empty(indices.shape, table.dtype)
    if flat.size == 0:
        return out
    if flat.dtype == np.uint8 and table.size >= 256:
        _lookup_256(flat, table, out.reshape(-1))
        return out
    lo, hi = _index_range(flat)
    n = table.size
    if lo < -n or hi >= n:
        bad = int(lo) if lo < -n else int(hi)
        raise IndexError(f"Gather index {bad} is out of range for a table of {n} entries")
    (_lookup if lo >= 0 else _lookup_wrapped)(flat, table, out.reshape(-1))
    return out


# ----------------------------------------------------------------- softmax


@njit(**JIT)
def _qsoftmax_rows(counters, x, cols, exp_table, ys, zy, qmin, qmax, out):  # pragma: no cover
    rows = x.size // cols
    per = max(1, CHUNK // max(cols, 1))
    ntasks = (rows + per - 1) // per
    e = np.empty(cols, np.float32)
    part = np.empty(8, np.float32)
    lo = np.float32(qmin - zy)
    hi = np.float32(qmax - zy)
    full = cols - cols % 8
    while True:
        t = claim(counters)
        if t >= ntasks:
            break
        for r in range(t * per, min(rows, (t + 1) * per)):
            xr = x[r * cols : (r + 1) * cols]  # slices: loops from 0 vectorize
            orow = out[r * cols : (r + 1) * cols]
            m = np.int32(xr[0])
            for k in range(cols):
                m = max(m, np.int32(xr[k]))
            off = 255 - m
            for k in range(cols):
                e[k] = exp_table[np.int32(xr[k]) + off]
            # 8 partial sums: breaks the add latency chain (fixed order, deterministic)
            for j in range(8):
                part[j] = 0.0
            for k in range(0, full, 8):
                for j in range(8):
                    part[j] += e[k + j]
            s = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5])
                                                                + (part[6] + part[7]))
            for k in range(full, cols):
                s += e[k]
            for k in range(cols):
                v = (e[k] / s) / ys
                if v < lo:
                    v = lo
                if v > hi:
                    v = hi
                orow[k] = np.int32((v + ROUNDING_MAGIC) - ROUNDING_MAGIC) + zy
        finish(counters)


def qlinear_softmax_last(
    x: np.ndarray, x_scale: np.float32, y_scale: np.float32, zy: int, dtype: np.dtype
) -> np.ndarray:
    """Softmax over the last axis of 8-bit x: exp from a 256-entry table (as ORT), one pass.

    exp_table[i] = exp(float32(i - 255) * x_scale); the row max subtracts exactly in the
    integer domain, the sum is float32 (8 interleaved partial sums), y = quantize(e / sum).
    Its work estimate sends 1x12x128x128 attention scores to both pool threads.
    """
    cols = x.shape[-1] if x.ndim else 1
    info = np.iinfo(dtype)
    table = np.exp(np.arange(-255, 1, dtype=np.float32) * np.float32(x_scale)).astype(np.float32)
    xf = np.ascontiguousarray(x).reshape(-1)
    out = np.empty(x.shape, dtype)
    rows = xf.size // max(cols, 1)
    per = max(1, CHUNK // max(cols, 1))
    run_tasks(_qsoftmax_rows, -(-rows // per), xf.size * 64, xf, np.int64(cols),
              table, np.float32(y_scale), np.int32(zy), np.int64(info.min), np.int64(info.max),
              out.reshape(-1))
    return out


# ----------------------------------------------------------------- global average pool


@njit(**JIT)
def _gap_rows(x, zx_size, mult, zy, lo, hi, out):  # pragma: no cover
    """x [rows, size] -> out[rows]: requantize(sum - zx*size)."""
    for r in range(x.shape[0]):
        acc = np.int32(0)
        for k in range(x.shape[1]):
            acc += np.int32(x[r, k])
        out[r] = requantize_value(acc - zx_size, mult, zy, lo, hi)


@njit(**JIT)
def _gap_channels_last(counters, x, zx_size, mult, zy, lo, hi, out):  # pragma: no cover
    """x [N, size, C] -> out[N, C], one image per task."""
    acc = np.empty(x.shape[2], np.int32)
    while True:
        n = claim(counters)
        if n >= x.shape[0]:
            break
        for c in range(x.shape[2]):
            acc[c] = 0
        for k in range(x.shape[1]):
            for c in range(x.shape[2]):
                acc[c] += np.int32(x[n, k, c])
        for c in range(x.shape[2]):
            out[n, c] = requantize_value(acc[c] - zx_size, mult, zy, lo, hi)
        finish(counters)


def qlinear_global_avg_pool(
    x: np.ndarray, channels_last: bool, zx: int, mult: np.float32, zy: int
) -> np.ndarray:
    """Integer channel sums minus zx*N, requantized with mult (MLAS qlgavgpool), in one pass."""
    info = np.iinfo(x.dtype)
    lo, hi = np.float32(info.min - zy), np.float32(info.max - zy)
    xc = np.ascontiguousarray(x)
    if channels_last:
        n, c = x.shape[0], x.shape[-1]
        size = xc.size // max(n * c, 1)
        out = np.empty((n, c), x.dtype)
        run_tasks(_gap_channels_last, n, xc.size * ELEMENT_WORK, xc.reshape(n, size, c),
                  np.int32(zx * size), np.float32(mult), np.int32(zy), lo, hi, out)
        return out.reshape((n,) + (1,) * (x.ndim - 2) + (c,))
    n, c = x.shape[0], x.shape[1]
    size = xc.size // max(n * c, 1)
    out = np.empty(n * c, x.dtype)
    unrecorded()  # a serial pass outside run_tasks
    _gap_rows(xc.reshape(n * c, size), np.int32(zx * size), np.float32(mult), np.int32(zy),
              lo, hi, out)
    return out.reshape((n, c) + (1,) * (x.ndim - 2))
