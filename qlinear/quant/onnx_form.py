"""The ONNX boundary: ONNX's compact Q/DQ parameters <-> full-rank `QuantParams`.

ONNX stores quantization parameters in three compact forms (QuantizeLinear /
DequantizeLinear inputs 1 and 2 plus attributes):

==============  ==============================  ==================================
ONNX form       scale / zero_point              attributes
==============  ==============================  ==================================
per-tensor      scalar (or one element)         none
per-axis        1-D ``[C]``, C = shape[axis]    ``axis``
blocked         rank of x, ``ceil(D/B)`` at     ``axis``, ``block_size`` (opset 21)
                axis, the dims of x elsewhere
==============  ==============================  ==================================

This module is the only place that converts between them and the full-rank form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from qlinear.errors import QuantParamsError
from qlinear.quant.dtypes import quant_dtype
from qlinear.quant.granularity import normalize_axis
from qlinear.quant.params import QuantParams

#: A tensor shape (None/str for unknown dims) or just its rank.
ShapeOrRank = Sequence[int | str | None] | int


def _known(d: Any) -> int | None:
    return int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None


def from_onnx(
    scale: Any,
    zero_point: Any,
    tensor_shape: ShapeOrRank,
    *,
    axis: int = 1,
    block_size: int | None = None,
    dtype: Any = None,
) -> QuantParams:
    """The QuantParams for ONNX Q/DQ inputs describing a tensor of `tensor_shape`.

    `dtype` is the quantized dtype when there is no zero point (ONNX ``output_dtype``;
    default uint8); with a zero point its dtype decides and must agree. `tensor_shape`
    may be a rank only; dims that are known are checked against the scale. A blocked
    scale whose last block is ragged (``D % block_size != 0``, allowed by ONNX) is
    rejected: QuantParams blocks divide exactly, so pad the tensor first (the runtime
    ops do).
    """
    rank = tensor_shape if isinstance(tensor_shape, int) else len(tensor_shape)
    dims: list[int | None] = (
        [None] * rank if isinstance(tensor_shape, int) else [_known(d) for d in tensor_shape]
    )
    shape_text = tuple(dims) if not isinstance(tensor_shape, int) else f"rank {rank}"
    s = np.asarray(scale)
    if s.dtype.kind not in "fV":
        raise QuantParamsError(f"scale must be a float tensor, got {s.dtype}")
    s = s.astype(np.float32)

    if zero_point is not None:
        z = np.asarray(zero_point)
        zdtype = quant_dtype(z.dtype).np_dtype
        if dtype is not None and quant_dtype(dtype).np_dtype != zdtype:
            raise QuantParamsError(
                f"zero point dtype {zdtype} disagrees with output dtype {np.dtype(dtype)}"
            )
        qdtype = zdtype
        if z.shape != s.shape and not (z.size == 1 and s.size == 1):
            raise QuantParamsError(
                f"zero point shape {z.shape} does not match scale shape {s.shape}"
            )
        z = z.astype(np.int32).reshape(s.shape)
    else:
        qdtype = quant_dtype(dtype if dtype is not None else np.uint8).np_dtype
        z = None

    if s.size == 1:  # per-tensor, whatever the attributes say (as onnx.reference)
        full = (1,) * rank
        return QuantParams(s.reshape(full), None if z is None else z.reshape(full), qdtype)

    if block_size:
        if block_size < 0:
            raise QuantParamsError(f"block_size must be positive, got {block_size}")
        if s.ndim != rank:
            raise QuantParamsError(
                f"blocked scale shape {s.shape} must have the rank of tensor shape {shape_text}"
            )
        ax = normalize_axis(axis, rank)
        for i, (d, sd) in enumerate(zip(dims, s.shape, strict=True)):
            if d is None:
                continue
            if i == ax:
                if -(-d // block_size) != sd:
                    raise QuantParamsError(
                        f"blocked scale shape {s.shape} does not fit tensor shape {shape_text}:"
                        f" dim {i} needs ceil({d} / {block_size}) = {-(-d // block_size)}"
                    )
                if d % block_size:
                    raise QuantParamsError(
                        f"tensor shape {shape_text}: dim {i} ({d}) is not a multiple of "
                        f"block_size {block_size} (ragged last block); pad the tensor first"
                    )
            elif d != sd:
                raise QuantParamsError(
                    f"blocked scale shape {s.shape} must equal tensor shape {shape_text} "
                    f"outside axis {ax}"
                )
        return QuantParams(s, z, qdtype)

    if s.ndim != 1:
        raise QuantParamsError(
            f"scale of shape {s.shape} for tensor shape {shape_text} must be a scalar, "
            "1-D (per-axis) or blocked (with block_size)"
        )
    ax = normalize_axis(axis, rank)
    if dims[ax] is not None and dims[ax] != s.shape[0]:
        raise QuantParamsError(
            f"per-axis scale shape {s.shape} does not match dim {ax} of tensor shape {shape_text}"
        )
    full = tuple(s.shape[0] if i == ax else 1 for i in range(rank))
    return QuantParams(s.reshape(full), None if z is None else z.reshape(full), qdtype)


def to_onnx(
    qp: QuantParams, tensor_shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(scale, zero_point, attributes) in the most compact ONNX form for `tensor_shape`.

    Per-tensor -> scalars; one channel axis -> ``[C]`` + ``axis``; otherwise the blocked
    form (``axis`` + ``block_size``, DequantizeLinear opset 21), repeating the scale
    along broadcast dims, which ONNX's blocked form spells out. Blocks along two or more
    axes have no ONNX form: QuantParamsError. The zero point comes back in ``qp.dtype``.
    """
    shape = tuple(int(d) for d in tensor_shape)
    block = qp.block_size(shape)
    if qp.scale.size == 1:
        return (
            qp.scale.reshape(()).copy(),
            qp.zero_point.reshape(()).astype(qp.dtype),
            {},
        )
    axis = qp.channel_axis()
    if axis is not None and block[axis] == 1:
        return (
            qp.scale.reshape(-1).copy(),
            qp.zero_point.reshape(-1).astype(qp.dtype),
            {"axis": axis},
        )
    blocked = [
        i for i, (b, s) in enumerate(zip(block, qp.scale.shape, strict=True)) if b != 1 and s != 1
    ]
    if len(blocked) > 1:
        raise QuantParamsError(
            f"scale shape {qp.scale.shape} blocks tensor shape {shape} along axes {blocked}; "
            "ONNX blocked quantization allows one"
        )
    # Every other dim of the scale is either the tensor's dim (block 1) or 1 (broadcast):
    # broadcasting spells the latter out, as ONNX's blocked form requires.
    ax = blocked[0] if blocked else 0
    full = tuple(qp.scale.shape[ax] if blocked and i == ax else d for i, d in enumerate(shape))
    scale = np.broadcast_to(qp.scale, full).copy()
    zp = np.broadcast_to(qp.zero_point, full).astype(qp.dtype)
    return scale, zp, {"axis": ax, "block_size": block[ax] if blocked else 1}
