"""Bias correction: cancel the mean output shift that weight rounding causes.

With dW = dequant(quant(W)) - W, the quantized layer's output is off on average by
``dW @ E[x]`` per output channel. E[x] (per input channel) comes from the calibration
pass; the shift is subtracted from the bias. Conv (any group; spatial padding
ignored), Gemm (transA=0) and MatMul followed by an Add of a constant [N] bias are
corrected; a Conv or Gemm without bias gets one.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from qlinear.calibration import ChannelStats
from qlinear.quant import dequantize_affine, quantize_affine
from qlinear.quantizer.plan import GraphIndex, Plan
from qlinear.quantizer.static import WeightOptions, weight_params


def correct_biases(
    model: onnx.ModelProto,
    plan: Plan,
    channels: Mapping[str, ChannelStats],
    opts: WeightOptions,
) -> onnx.ModelProto:
    """A copy of `model` whose biases absorb the expected weight-rounding error."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = GraphIndex(out)
    planned = set(plan.nodes)
    for node in out.graph.node:
        if node.name not in planned or node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        w_name = node.input[1]
        if w_name not in plan.weights or (node.name, 1) not in plan.weight_uses:
            continue
        stats = channels.get(node.input[0])
        if stats is None or stats.total is None or stats.rows == 0:
            continue
        w = index.array(w_name).astype(np.float64)
        qp = weight_params(index.array(w_name), plan.weights[w_name], opts)
        dw = dequantize_affine(quantize_affine(index.array(w_name), qp), qp) - w
        shift = _shift(node, dw, stats.mean, index)
        if shift is None:
            continue
        _apply(out, index, node, shift)
    return out


def _shift(
    node: onnx.NodeProto, dw: np.ndarray, mean: np.ndarray, index: GraphIndex
) -> np.ndarray | None:
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Conv":
        groups = attrs["group"].i if "group" in attrs else 1
        c_out, c_in_g = dw.shape[:2]
        if mean.size != c_in_g * groups or c_out % groups:
            return None
        per_group = mean.reshape(groups, c_in_g)
        group_of = np.arange(c_out) // (c_out // groups)
        summed = dw.reshape(c_out, c_in_g, -1).sum(axis=2)
        return np.einsum("oc,oc->o", summed, per_group[group_of])
    if node.op_type == "Gemm":
        if "transA" in attrs and attrs["transA"].i:
            return None
        b = dw.T if "transB" in attrs and attrs["transB"].i else dw
        alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
        return None if mean.size != b.shape[0] else alpha * (mean @ b)
    if dw.ndim != 2 or mean.size != dw.shape[0]:
        return None
    return mean @ dw


def _apply(
    model: onnx.ModelProto, index: GraphIndex, node: onnx.NodeProto, shift: np.ndarray
) -> None:
    if node.op_type in ("Conv", "Gemm"):
        beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
        if len(node.input) > 2 and node.input[2]:
            name = node.input[2]
            if name not in index.consts or len(index.consumers.get(name, [])) != 1:
                return
            b = index.array(name).astype(np.float64)
            if b.shape != shift.shape or beta == 0:
                return
            _set(model, name, (b - shift / beta).astype(np.float32))
        else:
            if beta == 0:
                return
            name = node.input[1] + "_corrected_bias"
            model.graph.initializer.append(
                numpy_helper.from_array((-shift / beta).astype(np.float32), name)
            )
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = name
        return
    users = index.consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add" or node.output[0] in index.outputs:
        return
    add = users[0]
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    if other not in index.consts or len(index.consumers.get(other, [])) != 1:
        return
    b = index.array(other).astype(np.float64)
    if b.shape != shift.shape:
        return
    _set(model, other, (b - shift).astype(np.float32))


def _set(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(value, name))
            return
