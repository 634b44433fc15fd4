"""Mul by a per-output-channel constant after Conv/MatMul/Gemm folded into the weights.

Rules:

- Float weights: ``Conv(x, W, B) -> Mul(c)`` with ``c`` non-unit only on the channel
  axis (1) of the output => ``W * c[C, 1, 1, 1]``, ``B * c``. ``MatMul(x, W [K, N])
  -> Mul(c)`` with ``c`` non-unit only on the last axis => ``W * c[1, N]``. ``Gemm``:
  ``transB=1`` => ``W [N, K] * c[N, 1]``, else ``W * c[1, N]``; ``C * c``.
- Quantized weights (a DequantizeLinear of constants): the factor goes into the weight
  scale along the weight's own output-channel axis (per-tensor scales become per-axis);
  only for positive factors, so no integer weight is negated.

The factor is always reshaped along the *weight's* output-channel axis (design §1):
a ``[C]`` factor never broadcasts into a ``[C, C]`` outer product.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qlinear.passes._infra import (
    RulePass,
    add_initializer,
    const_array,
    consumers,
    dq_of,
    replace_output,
)


def channel_factor(c: np.ndarray, out_rank: int, axis: int) -> np.ndarray | None:
    """`c` as a 1-D per-channel vector (or size-1) if it only varies along `axis`."""
    if c.ndim > out_rank:
        return None
    full = (1,) * (out_rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(full) if i != axis):
        return None
    return c.reshape(-1)


def weight_out_axis(node: ir.Node, w_rank: int) -> int:
    """The output-channel axis of the weight: Conv 0, MatMul last, Gemm 0 if transB."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        t = node.attributes["transB"].as_int() if "transB" in node.attributes else 0
        return 0 if t else 1
    return w_rank - 1


def along(vec: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """`vec` shaped to broadcast along `axis` of a rank-`rank` tensor only."""
    shape = [1] * rank
    shape[axis] = vec.size
    return vec.reshape(shape)


class FoldScalePass(RulePass):
    """Conv/MatMul/Gemm -> Mul(per-channel constant) => scaled weights (or scales)."""

    anchors = frozenset({"Mul"})
    logged = anchors

    def try_node(self, graph: ir.Graph, node: ir.Node) -> bool:
        return self._try_fold(graph, node)

    def _try_fold(self, graph: ir.Graph, mul: ir.Node) -> bool:
        for i in (0, 1):
            y, c_v = mul.inputs[i], mul.inputs[1 - i]
            prod = y.producer() if y is not None else None
            if (
                prod is not None
                and prod.op_type in ("Conv", "MatMul", "Gemm")
                and prod.domain in ("", "ai.onnx")
            ):
                break
        else:
            return self.refuse(mul, "no Conv/MatMul/Gemm operand")
        c = const_array(c_v)
        if c is None or c.dtype.kind != "f":
            return self.refuse(mul, "factor is not a float constant")
        if len(consumers(y)) != 1 or y.is_graph_output():
            return self.refuse(mul, f"{prod.op_type} output has other consumers")
        out_rank = len(y.shape) if y.shape is not None else None
        if out_rank is None:
            return self.refuse(mul, f"{prod.op_type} output rank unknown")
        y_axis = 1 if prod.op_type == "Conv" else out_rank - 1
        vec = channel_factor(c, out_rank, y_axis)
        if vec is None:
            return self.refuse(mul, "factor is not per output channel")
        w_v = prod.inputs[1]
        w = const_array(w_v)
        if w is not None and w.dtype.kind == "f":
            done = self._scale_float(graph, prod, w, vec)
        else:
            done = self._scale_quantized(graph, prod, vec)
        if isinstance(done, str):
            return self.refuse(mul, done)
        replace_output(graph, mul.outputs[0], y, take_name=True)
        return self.fired(mul, f"folded into {prod.op_type} weights")

    def _scale_float(
        self, graph: ir.Graph, prod: ir.Node, w: np.ndarray, vec: np.ndarray
    ) -> str | None:
        axis = weight_out_axis(prod, w.ndim)
        n = w.shape[axis]
        if vec.size not in (1, n):
            return f"factor has {vec.size} entries, weight has {n} output channels"
        if prod.op_type == "MatMul" and w.ndim != 2:
            return "MatMul weight is not 2-D"
        bias_v = prod.inputs[2] if len(prod.inputs) > 2 else None
        bias = const_array(bias_v) if bias_v is not None else None
        if bias_v is not None and bias is None:
            return "bias is not a constant"
        if bias is not None and bias.size not in (1, n):
            return "bias is not per output channel"
        vec_n = np.broadcast_to(vec.astype(np.float64), (n,))
        new_w = (w.astype(np.float64) * along(vec_n, w.ndim, axis)).astype(w.dtype)
        prod.replace_input_with(1, add_initializer(graph, new_w, "scaled_weight"))
        if bias is not None:
            new_b = (np.broadcast_to(bias.reshape(-1), (n,)) * vec_n).astype(bias.dtype)
            prod.replace_input_with(2, add_initializer(graph, new_b, "scaled_bias"))
        return None

    def _scale_quantized(self, graph: ir.Graph, prod: ir.Node, vec: np.ndarray) -> str | None:
        dq = dq_of(prod.inputs[1])
        if isinstance(dq, str):
            return "weight is neither a float constant nor a DequantizeLinear"
        q_w = const_array(dq.node.inputs[0])
        if q_w is None:
            return "quantized weight is not a constant"
        if len(prod.inputs) > 2 and prod.inputs[2] is not None:
            return "bias present on a quantized-weight node (not folded)"
        if len(consumers(prod.inputs[1])) != 1:
            return "weight DequantizeLinear is shared"
        if np.any(vec <= 0):
            return "factor is not positive (would negate integer weights)"
        axis = weight_out_axis(prod, q_w.ndim)
        if not dq.per_tensor and dq.axis != axis:
            return f"weight is per-axis on axis {dq.axis}, not the output-channel axis {axis}"
        n = q_w.shape[axis]
        if vec.size not in (1, n):
            return f"factor has {vec.size} entries, weight has {n} output channels"
        scale = np.broadcast_to(dq.params.scale.reshape(-1).astype(np.float64), (n,))
        zp = np.broadcast_to(dq.params.zero_point.reshape(-1), (n,)).astype(dq.dtype)
        new_scale = (scale * np.broadcast_to(vec, (n,))).astype(np.float32)
        node = dq.node
        node.replace_input_with(1, add_initializer(graph, new_scale, "scaled_w_scale"))
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        node.replace_input_with(2, add_initializer(graph, zp, "w_zero_point"))
        node.attributes["axis"] = ir.AttrInt64("axis", axis)
        return None
