"""Plan-time fusions of adjacent steps, invisible in the graph (it stays standard ONNX).

Some node sequences that every quantized model contains cost whole passes over a
tensor for nothing the graph could express better: Gather wants int32 indices, so a
table lookup of an 8-bit tensor is ``Cast -> Gather``; a float LayerNorm sits between
a DequantizeLinear and a QuantizeLinear; every linear layer of a quantized transformer
is a QLinearMatMul whose 8-bit output goes straight into a QLinearAdd of the constant
bias; an NHWC CNN quantizes its float NCHW input and then moves the channels last. The
session plans these as one step. A fusion only fires when the intermediate values have
no other reader and are not outputs, and the fused kernel runs the same arithmetic
functions as the separate ones (same bits).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import onnx

from qlinear.runtime.kernels.qelementwise import quantize_channels_last
from qlinear.runtime.kernels.qlayernorm import quantized_layer_norm
from qlinear.runtime.kernels.requant import ColumnAdd, column_add
from qlinear.runtime.ops.contrib_qlinear import _add_params
from qlinear.runtime.ops.quantized import QLinearMatMulKernel
from qlinear.runtime.registry import MS_DOMAIN

_SMALL_INTS = tuple(np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16))
_EIGHT_BIT = (np.dtype(np.uint8), np.dtype(np.int8))


class Step(Protocol):
    """What a fusion needs of a session step (`session._Step`)."""

    spec: Any
    kernel: Callable[..., Any]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def fuse_steps(steps: list, types: dict, graph_outputs: set[str]) -> list:
    """The plan with every applicable fusion applied (steps are changed in place)."""
    steps = _read_lookup_indices_directly(steps, types, graph_outputs)
    steps = _matmul_adds(steps, graph_outputs)
    steps = _quantized_layer_norms(steps, types, graph_outputs)
    # last: the fused step keeps QuantizeLinear's spec but not its output, so no other
    # fusion may look at it afterwards
    return _quantize_to_channels_last(steps, graph_outputs)


def _readers(steps: list) -> dict[str, int]:
    readers: dict[str, int] = {}
    for step in steps:
        for name in step.inputs:
            if name:
                readers[name] = readers.get(name, 0) + 1
    return readers


def _producers(steps: list) -> dict[str, int]:
    return {o: i for i, s in enumerate(steps) for o in s.outputs if o}


def _read_lookup_indices_directly(steps: list, types: dict, graph_outputs: set[str]) -> list:
    """Drop a Cast of small integers whose only reader is a Gather from a 1-D constant
    table, and let the Gather read the small integers (same values, same wrap-around);
    the Cast alone is a full pass over the tensor."""
    readers = _readers(steps)
    producer = _producers(steps)
    dropped: set[int] = set()
    for step in steps:
        spec = step.spec
        if spec.op_type != "Gather" or spec.domain or len(step.inputs) != 2:
            continue
        table = spec.const(0)
        index = step.inputs[1]
        j = producer.get(index)
        if table is None or table.ndim != 1 or j is None or index in graph_outputs:
            continue
        cast = steps[j]
        to = cast.spec.attr("to")
        if (
            cast.spec.op_type != "Cast"
            or cast.spec.domain
            or readers.get(index) != 1
            or to not in (onnx.TensorProto.INT32, onnx.TensorProto.INT64)
            or types.get(cast.inputs[0], (None, None))[0] not in _SMALL_INTS
        ):
            continue
        step.inputs = (step.inputs[0], cast.inputs[0])
        dropped.add(j)
    return [s for i, s in enumerate(steps) if i not in dropped]


def _per_tensor(step: Step) -> tuple[np.float32, np.ndarray] | None:
    """(scale, zero point) of a Q/DQ step with constant single-value parameters."""
    spec = step.spec
    if spec.domain or len(step.inputs) < 3 or not step.inputs[2]:
        return None
    scale, zp = spec.const(1), spec.const(2)
    if scale is None or zp is None or scale.size != 1 or zp.size != 1:
        return None
    if scale.dtype != np.float32 or zp.dtype not in _EIGHT_BIT:
        return None
    if spec.attr("output_dtype", 0) or spec.attr("block_size", 0):
        return None
    return np.float32(scale.reshape(-1)[0]), zp.reshape(())


def _quantized_layer_norms(steps: list, types: dict, graph_outputs: set[str]) -> list:
    """DequantizeLinear -> LayerNormalization (last axis) -> QuantizeLinear, per-tensor
    8-bit parameters, become one `quantized_layer_norm` step."""
    readers = _readers(steps)
    producer = _producers(steps)
    dropped: set[int] = set()
    for qi, q in enumerate(steps):
        if q.spec.op_type != "QuantizeLinear" or q.spec.domain:
            continue
        li = producer.get(q.inputs[0])
        if li is None or li in dropped:
            continue
        ln = steps[li]
        if ln.spec.op_type != "LayerNormalization" or ln.spec.domain or len(ln.outputs) != 1:
            continue
        di = producer.get(ln.inputs[0])
        if di is None or di in dropped:
            continue
        dq = steps[di]
        if dq.spec.op_type != "DequantizeLinear" or dq.spec.domain:
            continue
        fused = _layer_norm_kernel(dq, ln, q, types)
        if fused is None:
            continue
        if any(readers.get(v) != 1 or v in graph_outputs for v in (dq.outputs[0], ln.outputs[0])):
            continue
        ln.kernel = fused
        ln.inputs = (dq.inputs[0],)
        ln.outputs = q.outputs
        dropped.update((di, qi))
    return [s for i, s in enumerate(steps) if i not in dropped]


def _layer_norm_kernel(dq: Step, ln: Step, q: Step, types: dict) -> Callable | None:
    x_params, y_params = _per_tensor(dq), _per_tensor(q)
    if x_params is None or y_params is None:
        return None
    spec = ln.spec
    scale = spec.const(1)
    bias = spec.const(2) if len(ln.inputs) > 2 and ln.inputs[2] else None
    _, shape = types.get(dq.inputs[0], (None, None))
    if scale is None or (len(ln.inputs) > 2 and ln.inputs[2] and bias is None) or not shape:
        return None
    cols = shape[-1]
    axis = int(spec.attr("axis", -1))
    if not isinstance(cols, int) or axis not in (-1, len(shape) - 1):
        return None
    if int(spec.attr("stash_type", 1)) != 1 or scale.dtype != np.float32 or scale.size != cols:
        return None
    gamma = np.ascontiguousarray(scale.reshape(cols))
    beta = np.zeros(cols, np.float32) if bias is None else bias.astype(np.float32).reshape(cols)
    if bias is not None and (bias.dtype != np.float32 or bias.size != cols):
        return None
    x_scale, x_zp = x_params
    y_scale, y_zp = y_params
    eps = float(spec.attr("epsilon", 1e-5))
    originals = (dq.kernel, ln.kernel, q.kernel, dq.spec.consts, q.spec.consts)

    def run(x: np.ndarray) -> np.ndarray:
        if x.dtype != x_zp.dtype or x.ndim == 0 or x.shape[-1] != cols:
            dq_k, ln_k, q_k, dq_c, q_c = originals  # what the graph says, step by step
            f = dq_k(x, dq_c[1], dq_c[2])
            return q_k(ln_k(f, gamma, beta), q_c[1], q_c[2])
        return quantized_layer_norm(x, x_scale, int(x_zp), gamma, beta, eps, y_scale,
                                    int(y_zp), y_zp.dtype)

    return run


def _matmul_adds(steps: list, graph_outputs: set[str]) -> list:
    """QLinearMatMul -> QLinearAdd of a constant per-column vector (a linear layer's
    bias) becomes one GEMM whose epilogue does the add too (`requant.ColumnAdd`): the
    8-bit product is stored once instead of written, read back and written again."""
    readers = _readers(steps)
    producer = _producers(steps)
    dropped: set[int] = set()
    for ai, add in enumerate(steps):
        if add.spec.op_type != "QLinearAdd" or add.spec.domain != MS_DOMAIN:
            continue
        for pos in (0, 3):
            value = add.inputs[pos] if len(add.inputs) > pos else ""
            mi = producer.get(value)
            if mi is None or readers.get(value) != 1 or value in graph_outputs:
                continue
            fused = _matmul_add_kernel(steps[mi], add, pos)
            if fused is not None:
                steps[mi].kernel = fused
                steps[mi].outputs = add.outputs
                dropped.add(ai)
                break
    return [s for i, s in enumerate(steps) if i not in dropped]


def _scalars(spec: Any, indices: tuple[int, ...]) -> bool:
    """Every listed input is absent or a one-value constant (per-tensor)."""
    return all(
        not spec.has_input(i) or (spec.const(i) is not None and spec.const(i).size == 1)
        for i in indices
    )


def _matmul_add_kernel(mm: Step, add: Step, pos: int) -> Callable | None:
    """The fused kernel (QLinearMatMul's inputs, QLinearAdd's output; the product is the
    add's input `pos`), or None when the fusion does not apply."""
    n = _packed_columns(mm)
    other = add.spec.const(3 - pos)
    if n is None or other is None or other.dtype not in _EIGHT_BIT:
        return None
    if other.size != 1 and (other.shape[-1] != n or other.size != n):
        return None  # neither one value nor one per column
    second = _column_add(add.spec, pos, other, mm.spec.const(7).dtype, n)
    fused = None if second is None else mm.kernel.then_add(second)
    return None if fused is None else _at_least_rank(fused, other.ndim)


def _packed_columns(mm: Step) -> int | None:
    """N of a QLinearMatMul with a constant [K, N] B and constant scales and zero points
    (one value each, but B's may be per column), else None."""
    spec = mm.spec
    if spec.op_type != "QLinearMatMul" or spec.domain or not isinstance(mm.kernel,
                                                                         QLinearMatMulKernel):
        return None
    b, y_zp = spec.const(3), spec.const(7)
    if b is None or b.ndim != 2 or y_zp is None or y_zp.dtype not in _EIGHT_BIT:
        return None
    return b.shape[1] if _scalars(spec, (1, 2, 6, 7)) else None


def _column_add(spec: Any, pos: int, other: np.ndarray, q_dtype: np.dtype,
                n: int) -> ColumnAdd | None:
    """The QLinearAdd's second stage with its own float32 parameters (the function its
    kernel uses), when its scales and zero points are constant and per tensor."""
    c = spec.consts
    if not _scalars(spec, (1, 2, 4, 5, 6, 7)) or any(i not in c for i in (1, 4, 6)):
        return None
    # the add's output type: C's zero point's, else its first operand's
    out_dtype = c[7].dtype if 7 in c else (q_dtype if pos == 0 else other.dtype)
    if out_dtype not in _EIGHT_BIT:
        return None
    r_a, r_b, fixed = _add_params(c[1], c.get(2), c[4], c.get(5), c[6], c.get(7))
    return column_add(r_a, r_b, fixed, other, pos == 3, n, out_dtype)


def _at_least_rank(kernel: Callable, rank: int) -> Callable:
    """`kernel` with leading 1s added to its output up to `rank` dimensions (the shape
    broadcasting against a [1, .., 1, N] constant gives)."""
    if rank <= 1:
        return kernel

    def run(*args: np.ndarray) -> np.ndarray:
        out = kernel(*args)
        return out if out.ndim >= rank else out.reshape((1,) * (rank - out.ndim) + out.shape)

    return run


def _quantize_to_channels_last(steps: list, graph_outputs: set[str]) -> list:
    """QuantizeLinear (constant per-tensor 8-bit parameters) -> Transpose moving axis 1
    last becomes one `quantize_channels_last` step: every NHWC CNN starts so, and the
    separate Transpose reads the quantized image back and scatters it, which took as
    long as the quantize itself at batch 1."""
    readers = _readers(steps)
    producer = _producers(steps)
    dropped: set[int] = set()
    for ti, t in enumerate(steps):
        spec = t.spec
        if spec.op_type != "Transpose" or spec.domain or len(t.inputs) != 1:
            continue
        perm = spec.attr("perm")
        rank = 0 if perm is None else len(perm)
        if rank < 3 or tuple(int(p) for p in perm) != (0, *range(2, rank), 1):
            continue
        value = t.inputs[0]
        qi = producer.get(value)
        if qi is None or readers.get(value) != 1 or value in graph_outputs:
            continue
        q = steps[qi]
        if q.spec.op_type != "QuantizeLinear" or len(q.outputs) != 1:
            continue
        params = _per_tensor(q)
        if params is None:
            continue
        q.kernel = _quantize_channels_last_kernel(q, t, params, rank)
        q.inputs = q.inputs[:1]
        q.outputs = t.outputs
        dropped.add(ti)
    return [s for i, s in enumerate(steps) if i not in dropped]


def _quantize_channels_last_kernel(q: Step, t: Step, params: tuple[np.float32, np.ndarray],
                                   rank: int) -> Callable:
    """The fused kernel: float32 input of the planned rank in one pass, anything else
    (an int32 input, a wrong rank to report) through the two original kernels."""
    scale, zp = params
    info = np.iinfo(zp.dtype)
    z, qmin, qmax, dtype = zp.reshape(())[()], int(info.min), int(info.max), zp.dtype
    q_kernel, t_kernel, q_consts = q.kernel, t.kernel, q.spec.consts

    def run(x: np.ndarray) -> np.ndarray:
        if x.dtype != np.float32 or x.ndim != rank:
            return t_kernel(q_kernel(x, q_consts[1], q_consts[2]))  # the graph, step by step
        return quantize_channels_last(x, scale, z, qmin, qmax, dtype)

    # one run of native tasks: a CNN's native chain then starts at the float input
    run.replayable = True
    return run
