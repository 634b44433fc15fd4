"""Granularities: how finely a tensor shares its scale, each turned into one full-rank block size.

A granularity is only a way to *ask* for a scale shape; once quantization parameters
exist, their granularity is derived from the scale shape (see ``QuantParams.granularity``).

=========================  =============================  ===============================
granularity                block_size for shape (D0..Dn)  scale shape
=========================  =============================  ===============================
``PerTensor()``            (D0, ..., Dn)                  (1, ..., 1)
``PerAxis(axis=a)``        Di everywhere, 1 at a          1 everywhere, Da at a
``PerGroup(axis=a, g)``    1 everywhere, g at a           Di everywhere, Da // g at a
``PerBlock((b0..bn))``     (b0, ..., bn)                  (D0 // b0, ..., Dn // bn)
=========================  =============================  ===============================

``PerGroup`` is ONNX's blocked form (DequantizeLinear-21 ``axis`` + ``block_size``),
e.g. a MatMul weight ``[K, N]`` with ``PerGroup(axis=0, group_size=32)`` has scales
``[K // 32, N]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qlinear.errors import QuantParamsError


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""


@dataclass(frozen=True)
class PerAxis:
    """One scale per index of `axis` (per-channel)."""

    axis: int


@dataclass(frozen=True)
class PerGroup:
    """Blocks of `group_size` consecutive elements along `axis`, per element elsewhere."""

    axis: int
    group_size: int


@dataclass(frozen=True)
class PerBlock:
    """General blocks: one full-rank block size."""

    block_size: tuple[int, ...]


Granularity = PerTensor | PerAxis | PerGroup | PerBlock


def normalize_axis(axis: int, rank: int, what: str = "axis") -> int:
    """`axis` in [0, rank), accepting negative axes; QuantParamsError if out of range."""
    if not -rank <= axis < rank:
        raise QuantParamsError(f"{what} {axis} is out of range for a tensor of rank {rank}")
    return axis % rank


def block_size_for(granularity: Granularity, shape: Sequence[int]) -> tuple[int, ...]:
    """The full-rank block size `granularity` means for a tensor of `shape`."""
    shape = tuple(int(d) for d in shape)
    rank = len(shape)
    if isinstance(granularity, PerTensor):
        return shape
    if isinstance(granularity, PerAxis):
        axis = normalize_axis(granularity.axis, rank)
        return tuple(1 if i == axis else d for i, d in enumerate(shape))
    if isinstance(granularity, PerGroup):
        axis = normalize_axis(granularity.axis, rank)
        if granularity.group_size <= 0:
            raise QuantParamsError(f"group_size must be positive, got {granularity.group_size}")
        return tuple(granularity.group_size if i == axis else 1 for i in range(rank))
    if isinstance(granularity, PerBlock):
        block = tuple(int(b) for b in granularity.block_size)
        if len(block) != rank or any(b <= 0 for b in block):
            raise QuantParamsError(
                f"block_size {block} must have one positive entry per dim of shape {shape}"
            )
        return block
    raise QuantParamsError(f"unknown granularity {granularity!r}")


def scale_shape_for(granularity: Granularity, shape: Sequence[int]) -> tuple[int, ...]:
    """The scale shape of `granularity` on `shape` (exact division, else QuantParamsError)."""
    shape = tuple(int(d) for d in shape)
    block = block_size_for(granularity, shape)
    out = []
    for i, (d, b) in enumerate(zip(shape, block, strict=True)):
        if b == 0 and d == 0:  # a whole empty dim: one (unused) scale
            out.append(1)
        elif b == 0 or d % b:
            raise QuantParamsError(
                f"block size {block} does not divide tensor shape {shape} (dim {i}: {d} % {b})"
            )
        else:
            out.append(d // b)
    return tuple(out)
