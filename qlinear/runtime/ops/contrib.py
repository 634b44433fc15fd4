"""com.microsoft contrib ops, one section per op.

Implemented with ORT's CPU semantics (onnxruntime/contrib_ops/cpu/quantization/
dynamic_quantize_matmul.cc): the int8 GEMM writes float32 directly from its epilogue,
``y = float32(acc) * float32(a_scale * b_scale[n]) + bias[n]``; no int32 tensor is
materialised. Results match ORT within float rounding (the accumulator is exact; ORT
may fuse the multiply-add differently): tests use rtol=1e-6 plus an absolute slack of
one ulp of the largest output.
"""

from __future__ import annotations

import numpy as np

from qlinear.runtime.kernels.gemm import gemm, pack_matrix
from qlinear.runtime.kernels.requant import float_scale
from qlinear.runtime.ops.quantized import (
    BatchedB,
    _matmul_batched,
    _zp_known,
    column_vector,
    scalar_zero_point,
)
from qlinear.runtime.registry import MS_DOMAIN, Kernel, NodeSpec, register

# --------------------------------------------------------------------------- shared


def _int8_to_float_matmul(spec: NodeSpec, b_index: int, b_zp_index: int):
    """Plan-time packing of B shared by both ops; returns run(a_q, a_zp, b, b_zp, scale, bias)."""
    b_const = spec.const(b_index)
    pack_2d = b_const is not None and b_const.ndim == 2 and _zp_known(spec, b_zp_index)
    packed = (
        pack_matrix(
            b_const,
            column_vector(spec.const(b_zp_index), b_const.shape[1], "b_zero_point", np.int32),
        )
        if pack_2d
        else None
    )
    batched = BatchedB(b_const, spec.const(b_zp_index), _zp_known(spec, b_zp_index))

    def run(
        a_q: np.ndarray,
        a_zp: int,
        b: np.ndarray,
        b_zp: np.ndarray | None,
        scale: np.ndarray,
        bias: np.ndarray | None,
    ) -> np.ndarray:
        n = b.shape[-1] if b.ndim > 1 else 1
        fbias = column_vector(bias, n, "bias", np.float32)

        def run_2d(a2: np.ndarray, b2: np.ndarray | None) -> np.ndarray:
            p = (
                packed
                if b2 is None
                else pack_matrix(b2, column_vector(b_zp, b2.shape[1], "b_zero_point", np.int32))
            )
            return gemm(a2, a_zp, p, out_dtype=np.float32, fscale=scale, fbias=fbias,
                        memo=b2 is None)

        def run_3d(a3: np.ndarray, b3: np.ndarray) -> np.ndarray:
            return batched.run(a3, a_zp, b3, b_zp, out_dtype=np.float32, fscale=scale,
                               fbias=fbias)

        return _matmul_batched(
            a_q, b, run_2d, packed, run_3d if BatchedB.usable(b, b_zp) else None
        )

    return run


# --------------------------------------------------------------------------- MatMulIntegerToFloat


@register("MatMulIntegerToFloat", domain=MS_DOMAIN, since=1)
def _matmul_integer_to_float(spec: NodeSpec) -> Kernel:
    """Inputs A, B, a_scale, b_scale, a_zero_point?, b_zero_point?, bias?  ->  float32."""
    matmul = _int8_to_float_matmul(spec, 1, 5)

    def run(
        a: np.ndarray,
        b: np.ndarray,
        a_scale: np.ndarray,
        b_scale: np.ndarray,
        a_zp: np.ndarray | None = None,
        b_zp: np.ndarray | None = None,
        bias: np.ndarray | None = None,
    ) -> np.ndarray:
        n = b.shape[-1] if b.ndim > 1 else 1
        scale = float_scale(a_scale, column_vector(b_scale, n, "b_scale", np.float32), n)
        return matmul(a, scalar_zero_point(a_zp, "a_zero_point"), b, b_zp, scale, bias)

    return run


# --------------------------------------------------------------------------- DynamicQuantizeMatMul


def dynamic_quantize_uint8(a: np.ndarray) -> tuple[np.ndarray, np.float32, int]:
    """uint8 quantization of A as ORT's DynamicQuantizeMatMul does it (range includes 0)."""
    a = np.asarray(a, np.float32)
    lo = np.float32(min(np.float32(a.min()) if a.size else np.float32(0), np.float32(0)))
    hi = np.float32(max(np.float32(a.max()) if a.size else np.float32(0), np.float32(0)))
    scale = np.float32(1.0) if hi == lo else np.float32((hi - lo) / np.float32(255))
    zp_f = np.float32(np.float32(0) - lo / scale)
    zp = int(np.rint(min(max(zp_f, np.float32(0)), np.float32(255))))
    q = np.clip(np.rint(a / scale) + np.float32(zp), 0, 255).astype(np.uint8)
    return q, scale, zp


@register("DynamicQuantizeMatMul", domain=MS_DOMAIN, since=1)
def _dynamic_quantize_matmul(spec: NodeSpec) -> Kernel:
    """Inputs A (float32), B, b_scale, b_zero_point?, bias?: quantize A per tensor to uint8."""
    matmul = _int8_to_float_matmul(spec, 1, 3)

    def run(
        a: np.ndarray,
        b: np.ndarray,
        b_scale: np.ndarray,
        b_zp: np.ndarray | None = None,
        bias: np.ndarray | None = None,
    ) -> np.ndarray:
        q, a_scale, a_zp = dynamic_quantize_uint8(a)
        n = b.shape[-1] if b.ndim > 1 else 1
        scale = float_scale(a_scale, column_vector(b_scale, n, "b_scale", np.float32), n)
        return matmul(q, a_zp, b, b_zp, scale, bias)

    return run
