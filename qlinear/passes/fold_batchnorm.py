"""Float pre-pass: BatchNormalization (inference mode) folded into the Conv before it.

Rule: ``Conv(x, W const, B const?) -> BatchNormalization(s, b, mean, var const)``, the
Conv output used only by the BN, => ``Conv(x, W * f[:, None, None, None], (B - mean) * f
+ b)`` with ``f = s / sqrt(var + eps)``, computed in float64 and stored as float32.
Runs before quantization (the quantizer calls it); on a QDQ graph the weights are
DequantizeLinear outputs, not constants, and the rule refuses.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qlinear.passes._infra import (
    RulePass,
    add_initializer,
    const_array,
    consumers,
    replace_output,
    single_op,
)


class FoldBatchNormPass(RulePass):
    """Conv -> BatchNormalization => Conv with folded weights and bias."""

    anchors = frozenset({"BatchNormalization"})
    logged = anchors

    def try_node(self, graph: ir.Graph, node: ir.Node) -> bool:
        return self._try_fold(graph, node)

    def _try_fold(self, graph: ir.Graph, bn: ir.Node) -> bool:
        x = bn.inputs[0]
        conv = x.producer() if x is not None else None
        if not single_op(conv, "Conv"):
            return self.refuse(bn, "input is not produced by Conv")
        if len(consumers(x)) != 1 or x.is_graph_output():
            return self.refuse(bn, "Conv output has other consumers")
        if len([o for o in bn.outputs if o is not None and (o.uses() or o.is_graph_output())]) > 1:
            return self.refuse(bn, "BatchNormalization training outputs are used")
        if "training_mode" in bn.attributes and bn.attributes["training_mode"].as_int():
            return self.refuse(bn, "training mode")
        w = const_array(conv.inputs[1])
        if w is None or w.dtype.kind != "f":
            return self.refuse(bn, "Conv weight is not a float constant")
        params = [const_array(v) for v in bn.inputs[1:5]]
        if any(p is None for p in params):
            return self.refuse(bn, "BatchNormalization parameters are not constants")
        scale, shift, mean, var = (np.asarray(p, np.float64).reshape(-1) for p in params)
        eps = bn.attributes["epsilon"].as_float() if "epsilon" in bn.attributes else 1e-5
        c_out = w.shape[0]
        if scale.size != c_out:
            return self.refuse(bn, "BatchNormalization channels do not match Conv outputs")
        bias_in = conv.inputs[2] if len(conv.inputs) > 2 else None
        bias = np.zeros(c_out) if bias_in is None else const_array(bias_in)
        if bias is None:
            return self.refuse(bn, "Conv bias is not a constant")
        f = scale / np.sqrt(var + eps)
        # f is per output channel: reshape along Conv weights' axis 0 ([C, 1, 1, 1]).
        new_w = (w.astype(np.float64) * f.reshape((c_out,) + (1,) * (w.ndim - 1))).astype(w.dtype)
        new_b = ((np.asarray(bias, np.float64).reshape(-1) - mean) * f + shift).astype(w.dtype)
        w_v = add_initializer(graph, new_w, "bn_folded_weight")
        b_v = add_initializer(graph, new_b, "bn_folded_bias")
        conv.replace_input_with(1, w_v)
        if len(conv.inputs) > 2:
            conv.replace_input_with(2, b_v)
        else:
            conv.resize_inputs(3)
            conv.replace_input_with(2, b_v)
        replace_output(graph, bn.outputs[0], x, take_name=True)
        return self.fired(bn, "folded into Conv")
