"""Shape and data-movement ONNX ops in numpy (Reshape, Slice, Gather, Constant, ...).

Ops that only reinterpret or select (Reshape, Flatten, Squeeze, Unsqueeze, Slice,
Split, scalar Gather, Identity-like cases) return numpy views: no kernel writes to
its inputs, so aliasing is safe and saves a copy. Transpose and Expand return
contiguous arrays, so the work is done once instead of in every consumer.

Many operands moved from attributes (old opsets) to inputs (new opsets);
`IntsArg` resolves either form once at plan time, and at run time only when the
input is not a constant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from qlinear.runtime.kernels.qelementwise import gather_1d
from qlinear.runtime.kernels.transpose import SMALL_C, channels_last_small
from qlinear.runtime.registry import Kernel, NodeSpec, register


class IntsArg:
    """An int-list operand given as attribute `attr` (old opsets) or input `index` (new ones).

    `value` is the plan-time tuple when it is known (attribute or constant input);
    `get(args)` returns it, or reads the runtime input. None means "not given".
    """

    __slots__ = ("value", "index")

    def __init__(self, spec: NodeSpec, attr: str, index: int, as_input: bool) -> None:
        self.index: int | None = None
        self.value: tuple[int, ...] | None = None
        if not as_input:
            raw = spec.attr(attr)
            if raw is not None:
                self.value = tuple(int(v) for v in np.atleast_1d(raw))
        elif spec.has_input(index):
            const = spec.const(index)
            if const is None:
                self.index = index
            else:
                self.value = _ints(const)

    @property
    def is_const(self) -> bool:
        return self.index is None

    def get(self, args: Sequence[np.ndarray | None]) -> tuple[int, ...] | None:
        if self.index is None:
            return self.value
        value = args[self.index] if self.index < len(args) else None
        return None if value is None else _ints(value)


def _ints(a: np.ndarray) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(a).reshape(-1).tolist())


def _axis(axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise ValueError(f"axis {axis} out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


# -------------------------------------------------------------------- reshaping (views)


def _reshape_target(in_shape: tuple[int, ...], shape: tuple[int, ...], allowzero: bool):
    """ONNX Reshape: 0 copies the input dim (unless allowzero), -1 is inferred (numpy)."""
    if allowzero or 0 not in shape:
        return shape
    return tuple(in_shape[i] if d == 0 else d for i, d in enumerate(shape))


@register("Reshape", since=1)
def _reshape(spec: NodeSpec) -> Kernel:
    shape_arg = IntsArg(spec, "shape", 1, as_input=spec.opset >= 5)
    allowzero = bool(spec.attr("allowzero", 0))
    if shape_arg.is_const and (allowzero or 0 not in (shape_arg.value or ())):
        fixed = shape_arg.value

        def run_fixed(x: np.ndarray, *rest: np.ndarray | None) -> np.ndarray:
            return x.reshape(fixed)

        return run_fixed

    def run(x: np.ndarray, *rest: np.ndarray | None) -> np.ndarray:
        shape = shape_arg.get((x, *rest))
        return x.reshape(_reshape_target(x.shape, shape, allowzero))

    return run


@register("Flatten", since=1)
def _flatten(spec: NodeSpec) -> Kernel:
    axis = int(spec.attr("axis", 1))

    def run(x: np.ndarray) -> np.ndarray:
        a = axis + x.ndim if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))

    run.replayable = True  # a view: nothing to record, a chain's consumers read its buffer
    return run


@register("Squeeze", since=1)
def _squeeze(spec: NodeSpec) -> Kernel:
    axes_arg = IntsArg(spec, "axes", 1, as_input=spec.opset >= 13)

    def run(x: np.ndarray, *rest: np.ndarray | None) -> np.ndarray:
        axes = axes_arg.get((x, *rest))
        if axes is None:  # no axes: drop every 1-sized dim
            return np.squeeze(x)
        return np.squeeze(x, axis=tuple(_axis(a, x.ndim) for a in axes))

    return run


@register("Unsqueeze", since=1)
def _unsqueeze(spec: NodeSpec) -> Kernel:
    axes_arg = IntsArg(spec, "axes", 1, as_input=spec.opset >= 13)

    def run(x: np.ndarray, *rest: np.ndarray | None) -> np.ndarray:
        axes = axes_arg.get((x, *rest)) or ()
        rank = x.ndim + len(axes)
        new_axes = {_axis(a, rank) for a in axes}
        if len(new_axes) != len(axes):
            raise ValueError(f"Unsqueeze axes {axes} repeat an axis")
        dims = iter(x.shape)
        return x.reshape(tuple(1 if i in new_axes else next(dims) for i in range(rank)))

    return run


# ----------------------------------------------------------------- selecting (views)


_INT64_MAX = 2**63 - 1
_INT64_MIN = -(2**63)


def _slice_index(
    shape: tuple[int, ...],
    starts: Sequence[int],
    ends: Sequence[int],
    axes: Sequence[int] | None,
    steps: Sequence[int] | None,
) -> tuple[slice, ...]:
    """Basic-index tuple for ONNX Slice, clamping starts/ends the way ONNX does."""
    rank = len(shape)
    axes = range(len(starts)) if axes is None else axes
    steps = (1,) * len(starts) if steps is None else steps
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise ValueError("Slice starts, ends, axes and steps differ in length")
    index = [slice(None)] * rank
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        a = _axis(axis, rank)
        dim = shape[a]
        if step == 0:
            raise ValueError("Slice step cannot be 0")
        if step < 0 and end == _INT64_MAX:
            # ONNX clamps this to an empty slice; ORT (and exporters relying on it) read
            # INT64_MAX as "unbounded" in either direction. Follow ORT.
            end = _INT64_MIN
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            index[a] = slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
        elif dim == 0:
            index[a] = slice(0, 0)
        else:  # negative step: start in [0, dim-1], end in [-1, dim-1]; -1 means "past 0"
            end = min(max(end, -1), dim - 1)
            index[a] = slice(min(max(start, 0), dim - 1), None if end < 0 else end, step)
    return tuple(index)


@register("Slice", since=1)
def _slice(spec: NodeSpec) -> Kernel:
    as_input = spec.opset >= 10
    args = [
        IntsArg(spec, name, i, as_input)
        for i, name in enumerate(("starts", "ends", "axes", "steps"), start=1)
    ]
    if all(a.is_const for a in args):
        starts, ends, axes, steps = (a.value for a in args)
        cache: dict[tuple[int, ...], tuple[slice, ...]] = {}

        def run_const(x: np.ndarray, *rest: np.ndarray | None) -> np.ndarray:
            index = cache.get(x.shape)
            if index is None:
                index = cache[x.shape] = _slice_index(x.shape, starts, ends, axes, steps)
            return x[index]

        return run_const

    def run(x: np.ndarray, *rest: np.ndarray | None) -> np.ndarray:
        all_args = (x, *rest)
        starts, ends, axes, steps = (a.get(all_args) for a in args)
        return x[_slice_index(x.shape, starts, ends, axes, steps)]

    return run


def _split_sizes(dim: int, split: tuple[int, ...] | None, n: int, uneven: bool) -> list[int]:
    if split is not None:
        if sum(split) != dim:
            raise ValueError(f"Split sizes {split} do not add up to {dim}")
        return list(split)
    if uneven:  # opset 18 num_outputs: ceil-sized chunks, the last one smaller
        chunk = -(-dim // n)
        return [min(chunk, max(dim - i * chunk, 0)) for i in range(n)]
    if dim % n:
        raise ValueError(f"Split cannot cut dim {dim} into {n} equal parts")
    return [dim // n] * n


@register("Split", since=1)
def _split(spec: NodeSpec) -> Kernel:
    axis = int(spec.attr("axis", 0))
    n = len(spec.outputs)
    if spec.opset == 1 and spec.has_input(1):
        split_arg = IntsArg(spec, "split", 1, as_input=True)
    else:
        split_arg = IntsArg(spec, "split", 1, as_input=spec.opset >= 13)
    num_outputs = spec.attr("num_outputs") if spec.opset >= 18 else None
    if num_outputs is not None and int(num_outputs) != n:
        raise ValueError(f"{spec.describe()}: num_outputs={num_outputs} but {n} outputs")

    def run(x: np.ndarray, *rest: np.ndarray | None) -> list[np.ndarray]:
        a = _axis(axis, x.ndim)
        sizes = _split_sizes(x.shape[a], split_arg.get((x, *rest)), n, num_outputs is not None)
        lead = (slice(None),) * a
        out, offset = [], 0
        for size in sizes:
            out.append(x[(*lead, slice(offset, offset + size))])
            offset += size
        return out

    return run


@register("Gather", since=1)
def _gather(spec: NodeSpec) -> Kernel:
    axis = int(spec.attr("axis", 0))
    table = spec.const(0)
    if table is not None and table.ndim == 1 and table.dtype != object:
        # a lookup table (embedding ids, quantized-activation LUTs): one numba pass
        values = np.ascontiguousarray(table)

        def lookup(x: np.ndarray, indices: np.ndarray) -> np.ndarray:
            if indices.ndim == 0:
                return x[int(indices)]
            return gather_1d(values, indices)

        return lookup

    def run(x: np.ndarray, indices: np.ndarray) -> np.ndarray:
        a = _axis(axis, x.ndim)
        if indices.ndim == 0:  # a scalar index is basic indexing: a view, no copy
            return x[(slice(None),) * a + (int(indices),)]
        return np.take(x, indices, axis=a)  # negative indices count from the end

    return run


# -------------------------------------------------------------- copying data movement


@register("Transpose", since=1)
def _transpose(spec: NodeSpec) -> Kernel:
    perm = spec.attr("perm")
    perm = None if perm is None else tuple(int(p) for p in perm)

    to_last = perm is not None and len(perm) >= 3 and perm == (0, *range(2, len(perm)), 1)

    def run(x: np.ndarray) -> np.ndarray:
        if to_last and x.ndim == len(perm) and x.shape[1] <= SMALL_C and x.dtype != object:
            return channels_last_small(x)  # an image to NHWC: numpy's copy is 5x slower
        return np.ascontiguousarray(np.transpose(x, perm))

    return run


@register("Concat", since=1)
def _concat(spec: NodeSpec) -> Kernel:
    axis = int(spec.attr("axis", 1))

    def run(*xs: np.ndarray) -> np.ndarray:
        return np.concatenate(xs, axis=_axis(axis, xs[0].ndim))

    return run


@register("Expand", since=8)
def _expand(spec: NodeSpec) -> Kernel:
    shape_arg = IntsArg(spec, "shape", 1, as_input=True)

    def run(x: np.ndarray, shape: np.ndarray) -> np.ndarray:
        target = np.broadcast_shapes(x.shape, shape_arg.get((x, shape)))
        # a writable, contiguous result (broadcast_to gives a read-only 0-stride view)
        out = np.empty(target, dtype=x.dtype)
        out[...] = x
        return out

    return run


# ---------------------------------------------------------------- shapes and constants


@register("Shape", since=1)
def _shape(spec: NodeSpec) -> Kernel:
    start = int(spec.attr("start", 0))
    end = spec.attr("end")
    window = slice(start, None if end is None else int(end))  # python slicing clamps as ONNX

    def run(x: np.ndarray) -> np.ndarray:
        return np.array(x.shape[window], dtype=np.int64)

    return run


def _dense_from_sparse(sparse: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    dims = tuple(sparse.dims)
    dense = np.zeros(dims, dtype=values.dtype)
    if indices.ndim == 2:  # [nnz, rank] coordinates
        dense[tuple(indices.T)] = values
    else:  # [nnz] positions in the flattened tensor
        dense.reshape(-1)[indices] = values
    return dense


def constant_value(spec: NodeSpec) -> np.ndarray:
    """The array a Constant node produces, from whichever value* attribute it carries."""
    attrs = spec.attrs
    if "value" in attrs:
        return np.asarray(attrs["value"])
    if "sparse_value" in attrs:
        return _dense_from_sparse(attrs["sparse_value"])
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32).reshape(-1)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64).reshape(-1)
    if "value_string" in attrs:
        return np.array(attrs["value_string"], dtype=object)
    if "value_strings" in attrs:
        return np.array(attrs["value_strings"], dtype=object).reshape(-1)
    raise ValueError(f"{spec.describe()} has no value attribute")


@register("Constant", since=1)
def _constant(spec: NodeSpec) -> Kernel:
    # Built once; returned as-is on every run (no kernel writes to its inputs).
    value = constant_value(spec)
    return lambda: value


@register("ConstantOfShape", since=9)
def _constant_of_shape(spec: NodeSpec) -> Kernel:
    fill = spec.attr("value")
    fill = np.zeros(1, dtype=np.float32) if fill is None else np.asarray(fill).reshape(-1)
    scalar, dtype = fill[0], fill.dtype
    shape_arg = IntsArg(spec, "shape", 0, as_input=True)

    def run(shape: np.ndarray) -> np.ndarray:
        return np.full(shape_arg.get((shape,)), scalar, dtype=dtype)

    return run
