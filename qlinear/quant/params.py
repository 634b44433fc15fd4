"""`QuantParams`: the one full-rank representation of scale, zero point and quantized dtype.

The scale is a singleton (per-tensor) or has the rank of the tensor it describes; its
shape *is* the block layout (``block_size[i] = tensor.shape[i] // scale.shape[i]``).
Granularity and channel axis are derived from that shape, never stored, so there is
nothing to keep in sync. The ONNX compact forms (scalar, ``[C]`` + axis, blocked) are
converted in :mod:`qlinear.quant.onnx_form` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qlinear.errors import QuantParamsError
from qlinear.quant.dtypes import QuantDType, quant_dtype
from qlinear.quant.granularity import Granularity, PerAxis, PerBlock, PerGroup, PerTensor


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class QuantParams:
    """Scale (float32), zero point (int32, same shape) and quantized dtype.

    ``zero_point`` is stored as int32 whatever the quantized dtype (int4 included) so
    arithmetic never has to special-case ml_dtypes; it is range-checked against
    ``dtype``. ``None`` means all zeros; a size-1 zero point broadcasts to the scale's
    shape. The arrays are read-only copies, so a QuantParams can be shared safely.
    Scales must be finite and non-negative (zero is allowed: a dead channel).
    """

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: np.dtype

    def __init__(self, scale: Any, zero_point: Any = None, dtype: Any = np.uint8) -> None:
        qd = quant_dtype(dtype)
        s = np.array(scale, dtype=np.float32)  # copy
        if not np.all(np.isfinite(s)) or np.any(s < 0):
            raise QuantParamsError(
                f"scale must be finite and >= 0, got {s if s.size <= 8 else 'array'}"
                f" of shape {s.shape}"
            )
        if zero_point is None:
            zp = np.zeros(s.shape, dtype=np.int32)
        else:
            raw = np.asarray(zero_point)
            zp = raw.astype(np.int32)
            if raw.dtype.kind == "f" and not np.array_equal(zp, raw):
                raise QuantParamsError(f"zero point must be integral, got {raw}")
            if zp.shape != s.shape:
                if zp.size != 1:
                    raise QuantParamsError(
                        f"zero point shape {zp.shape} does not match scale shape {s.shape}"
                    )
                zp = np.full(s.shape, zp.reshape(()), dtype=np.int32)
            else:
                zp = zp.copy()
        if zp.size and (zp.min() < qd.qmin or zp.max() > qd.qmax):
            raise QuantParamsError(
                f"zero point outside [{qd.qmin}, {qd.qmax}] of {qd.name}: "
                f"min {zp.min()}, max {zp.max()}"
            )
        if qd.is_float and np.any(zp != 0):
            raise QuantParamsError(f"{qd.name} has no zero point; it must be 0")
        object.__setattr__(self, "scale", _readonly(s))
        object.__setattr__(self, "zero_point", _readonly(zp))
        object.__setattr__(self, "dtype", qd.np_dtype)

    # -- the dtype ---------------------------------------------------------------------

    @property
    def qdtype(self) -> QuantDType:
        return quant_dtype(self.dtype)

    @property
    def qmin(self) -> int | float:
        return self.qdtype.qmin

    @property
    def qmax(self) -> int | float:
        return self.qdtype.qmax

    # -- the shape ---------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        return self.scale.shape

    @property
    def is_per_tensor(self) -> bool:
        return self.scale.size == 1

    def channel_axis(self) -> int | None:
        """0 if every scale dim is 1, the single non-unit dim if there is one, else None."""
        non_unit = [i for i, d in enumerate(self.scale.shape) if d != 1]
        if not non_unit:
            return 0
        return non_unit[0] if len(non_unit) == 1 else None

    def block_size(self, tensor_shape: Sequence[int]) -> tuple[int, ...]:
        """``tensor_shape[i] // scale.shape[i]`` per dim; QuantParamsError if it does not divide.

        A singleton scale of any rank is per-tensor: its block is the whole tensor.
        """
        shape = tuple(int(d) for d in tensor_shape)
        if self.scale.size == 1:
            return shape
        if self.scale.ndim != len(shape):
            raise QuantParamsError(
                f"scale shape {self.scale.shape} must be a singleton or have the rank of "
                f"tensor shape {shape}"
            )
        block = []
        for i, (d, s) in enumerate(zip(shape, self.scale.shape, strict=True)):
            if s == 0:
                if d != 0:
                    raise QuantParamsError(
                        f"scale shape {self.scale.shape} has an empty dim {i} but tensor "
                        f"shape {shape} does not"
                    )
                block.append(1)
            elif d % s:
                raise QuantParamsError(
                    f"scale shape {self.scale.shape} does not divide tensor shape {shape} "
                    f"(dim {i}: {d} is not a multiple of {s})"
                )
            else:
                block.append(d // s)
        return tuple(block)

    def validate(self, tensor_shape: Sequence[int]) -> None:
        """Raise QuantParamsError unless these parameters fit a tensor of `tensor_shape`."""
        self.block_size(tensor_shape)

    def granularity(self, tensor_shape: Sequence[int]) -> Granularity:
        """The granularity the scale shape encodes for `tensor_shape` (see granularity.py)."""
        block = self.block_size(tensor_shape)
        if self.scale.size == 1:
            return PerTensor()
        axis = self.channel_axis()
        if axis is not None and block[axis] == 1:
            return PerAxis(axis)
        blocked = [i for i, b in enumerate(block) if b != 1]
        if len(blocked) == 1:
            return PerGroup(blocked[0], block[blocked[0]])
        return PerBlock(block)

    def expand(self, tensor_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(scale, zero_point) repeated along blocked axes so they broadcast to `tensor_shape`.

        Per-tensor parameters come back as 0-d arrays; dims whose scale dim is 1 stay 1
        (broadcasting does the rest), so only true blocks cost memory.
        """
        block = self.block_size(tensor_shape)
        if self.scale.size == 1:
            return self.scale.reshape(()), self.zero_point.reshape(())
        scale, zp = self.scale, self.zero_point
        for i, b in enumerate(block):
            if b != 1 and scale.shape[i] != 1:
                scale = np.repeat(scale, b, axis=i)
                zp = np.repeat(zp, b, axis=i)
        return scale, zp

    # -- value semantics ---------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantParams):
            return NotImplemented
        return (
            self.dtype == other.dtype
            and self.scale.shape == other.scale.shape
            and np.array_equal(self.scale.view(np.uint32), other.scale.view(np.uint32))
            and np.array_equal(self.zero_point, other.zero_point)
        )

    def __hash__(self) -> int:
        return hash(
            (str(self.dtype), self.scale.shape, self.scale.tobytes(), self.zero_point.tobytes())
        )

    def __repr__(self) -> str:
        def short(a: np.ndarray) -> str:
            return repr(a.reshape(()).item()) if a.size == 1 else f"<{a.dtype} {a.shape}>"

        return (
            f"QuantParams(scale={short(self.scale)}, zero_point={short(self.zero_point)}, "
            f"dtype={self.dtype.name})"
        )
