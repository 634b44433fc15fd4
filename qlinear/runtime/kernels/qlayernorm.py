"""DequantizeLinear -> LayerNormalization -> QuantizeLinear in one pass over the rows.

A quantized transformer keeps LayerNorm in float between a DQ and a Q, so the runtime
made three passes (and two float32 temporaries) over each hidden state. Here each row
is dequantized into a scratch row, normalized and quantized while it is in L1. The
three steps call the very functions the separate kernels use (`dequantize_row`,
`layer_norm_row`, `quantize_row`), so the bits are those of the unfused graph.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from qlinear.runtime.kernels.config import JIT
from qlinear.runtime.kernels.float_nn import layer_norm_row
from qlinear.runtime.kernels.parallel import claim, finish, run_tasks
from qlinear.runtime.kernels.qelementwise import dequantize_row, quantize_row

#: Rows per claimed task.
ROWS = 8


@njit(**JIT)
def _qlayer_norm_rows(
    counters, q, x_scale, x_zp, scale, bias, eps, y_scale, y_zp, qmin, qmax, out
):  # pragma: no cover
    rows, cols = q.shape
    ntasks = (rows + ROWS - 1) // ROWS
    xr = np.empty(cols, np.float32)
    yr = np.empty(cols, np.float32)
    zf = np.float32(x_zp)
    while True:
        t = claim(counters)
        if t >= ntasks:
            break
        for r in range(t * ROWS, min(rows, (t + 1) * ROWS)):
            dequantize_row(q[r], x_scale, zf, xr)
            layer_norm_row(xr, scale, bias, eps, yr)
            quantize_row(yr, y_scale, y_zp, qmin, qmax, out[r])
        finish(counters)


def quantized_layer_norm(
    q: np.ndarray,
    x_scale: np.float32,
    x_zp: int,
    scale: np.ndarray,
    bias: np.ndarray,
    eps: float,
    y_scale: np.float32,
    y_zp: int,
    out_dtype: np.dtype,
) -> np.ndarray:
    """Q(LayerNorm(DQ(q))) over the last axis, per-tensor 8-bit in and out, float32 math."""
    cols = q.shape[-1]
    q2 = np.ascontiguousarray(q).reshape(-1, cols)
    out = np.empty(q2.shape, out_dtype)
    info = np.iinfo(out_dtype)
    rows = q2.shape[0]
    run_tasks(_qlayer_norm_rows, -(-rows // ROWS), q2.size * 16, q2, np.float32(x_scale),
              np.int32(x_zp), scale, bias, float(eps), np.float32(y_scale), np.int32(y_zp),
              np.int64(info.min), np.int64(info.max), out)
    return out.reshape(q.shape)
