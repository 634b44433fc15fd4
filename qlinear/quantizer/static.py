"""Insert QuantizeLinear/DequantizeLinear pairs (and weight DequantizeLinear) per a `Plan`.

Activations get one Q -> DQ pair per tensor, read only by the quantized consumers
listed in the plan (float consumers and graph outputs keep the float value).
Weights are stored quantized with a DequantizeLinear in front (per-tensor, per-axis
or opset-21 blocked); Conv/Gemm biases become int32 with scale x_scale * w_scale[n]
and zero point 0, as QLinearConv/QGemm expect. All arithmetic goes through
qlinear.quant; the compact ONNX form comes from qlinear.quant.onnx_form.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qlinear.quant import (
    Granularity,
    PerAxis,
    PerGroup,
    PerTensor,
    QuantParams,
    bias_qparams,
    choose_qparams,
    choose_qparams_for_tensor,
    dequantize_affine,
    quant_dtype,
    quantize_affine,
    scale_shape_for,
    to_onnx,
)
from qlinear.quantizer.plan import GraphIndex, Plan, WeightSpec
from qlinear.quantizer.prepare import remove_unused_initializers


@dataclass(frozen=True)
class WeightOptions:
    """Weight dtype, granularity ("per_tensor", "per_channel", "blockwise") and symmetry."""

    dtype: np.dtype
    granularity: str
    symmetric: bool
    block_size: int
    activation_dtype: np.dtype
    activation_symmetric: bool


def weight_params(array: np.ndarray, spec: WeightSpec, opts: WeightOptions) -> QuantParams:
    """Parameters for one constant; blockwise falls back to per-channel if K % block != 0."""
    if spec.as_activation:
        return choose_qparams_for_tensor(
            array, opts.activation_dtype, PerTensor(), symmetric=opts.activation_symmetric
        )
    gran: PerTensor | PerAxis | PerGroup = PerTensor()
    if opts.granularity != "per_tensor" and spec.axis is not None and array.ndim >= 1:
        gran = PerAxis(spec.axis)
        if (
            opts.granularity == "blockwise"
            and spec.reduce_axis is not None
            and array.shape[spec.reduce_axis] % opts.block_size == 0
            and array.ndim == 2
        ):
            gran = PerGroup(spec.reduce_axis, opts.block_size)
    if quant_dtype(opts.dtype).bits <= 4:
        return _clip_search(array, gran, opts)
    return choose_qparams_for_tensor(array, opts.dtype, gran, symmetric=opts.symmetric)


def _clip_search(array: np.ndarray, gran: Granularity, opts: WeightOptions) -> QuantParams:
    """4-bit weights: per block, shrink the range (1.0 .. 0.5) to the least squared error.

    With 15 levels, clipping a few large weights buys more precision for the rest.
    """
    shape = scale_shape_for(gran, array.shape)
    split: list[int] = []
    for d, sd in zip(array.shape, shape, strict=True):
        split += [sd, d // sd]
    blocks = array.reshape(split)
    axes = tuple(range(1, 2 * array.ndim, 2))
    mn, mx = blocks.min(axis=axes), blocks.max(axis=axes)
    best_err = np.full(shape, np.inf)
    best_f = np.ones(shape, np.float32)
    for f in np.linspace(1.0, 0.5, 11, dtype=np.float32):
        qp = choose_qparams(mn * f, mx * f, opts.dtype, symmetric=opts.symmetric)
        err = (dequantize_affine(quantize_affine(array, qp), qp) - array) ** 2
        err = err.reshape(split).sum(axis=axes)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_f = np.where(better, f, best_f)
    return choose_qparams(mn * best_f, mx * best_f, opts.dtype, symmetric=opts.symmetric)


def bias_params(x: QuantParams, w: QuantParams, bias_len: int) -> QuantParams | None:
    """int32 bias parameters (see `bias_qparams`); None if w is not per-tensor/axis."""
    axis = w.channel_axis()
    if axis is None or (w.scale.size not in (1, bias_len)):
        return None
    qp = bias_qparams(x.scale, w.scale, bias_len)
    if np.any(qp.scale < np.finfo(np.float32).tiny):
        return None
    return qp


class Emitter:
    """Builds the new node list and initializers for one model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.used = {t.name for t in self.graph.initializer}
        self.used |= {o for n in self.graph.node for o in n.output}
        self.used |= {i.name for i in self.graph.input} | {n.name for n in self.graph.node}
        self.new_inits: list[onnx.TensorProto] = []
        self.before: dict[str, list[onnx.NodeProto]] = {}  # node name -> nodes to put before

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name

    def init(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.new_inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def qparams_inputs(
        self, base: str, qp: QuantParams, shape: tuple[int, ...]
    ) -> tuple[list[str], dict[str, int]]:
        if qp.scale.size == 1:
            scale, zp, attrs = qp.scale.reshape(()), qp.zero_point.reshape(()), {}
            zp = zp.astype(qp.dtype)
        else:
            scale, zp, attrs = to_onnx(qp, shape)
        names = [self.init(base + "_scale", scale.astype(np.float32)),
                 self.init(base + "_zero_point", zp)]  # fmt: skip
        return names, attrs


def emit_static(
    model: onnx.ModelProto,
    plan: Plan,
    act_params: Mapping[str, QuantParams],
    opts: WeightOptions,
) -> onnx.ModelProto:
    """A new model: `model` (prepared float) with the plan's Q/DQ inserted."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = GraphIndex(out)
    em = Emitter(out)
    act_dq: dict[str, str] = {}
    inserted: dict[str, list[onnx.NodeProto]] = {}  # producer-side insertion point -> nodes
    graph_inputs = {i.name for i in out.graph.input}

    for name in plan.activations:
        qp = act_params[name]
        base = _safe(name)
        (scale, zp), _ = em.qparams_inputs(base, qp, ())
        q_name, dq_name = em.fresh(base + "_quantized"), em.fresh(base + "_dequantized")
        q = helper.make_node("QuantizeLinear", [name, scale, zp], [q_name],
                             name=em.fresh(base + "_QuantizeLinear"))  # fmt: skip
        dq = helper.make_node("DequantizeLinear", [q_name, scale, zp], [dq_name],
                              name=em.fresh(base + "_DequantizeLinear"))  # fmt: skip
        key = "" if name in graph_inputs or name not in index.producer else name
        inserted.setdefault(key, []).extend([q, dq])
        act_dq[name] = dq_name

    weight_dq: dict[str, str] = {}
    weight_qp: dict[str, QuantParams] = {}
    for name, spec in plan.weights.items():
        array = index.array(name)
        qp = weight_params(array, spec, opts)
        weight_qp[name] = qp
        weight_dq[name] = _emit_const(em, name, array, qp, inserted)

    bias_dq: dict[str, str] = {}
    for name, (x, w, _node) in plan.biases.items():
        b = index.array(name)
        if x not in act_params or w not in weight_qp or b.ndim != 1:
            continue
        qp = bias_params(act_params[x], weight_qp[w], b.shape[0])
        if qp is None:
            continue
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ratio = np.abs(b.astype(np.float64) / qp.scale.astype(np.float64))
        if not np.all(ratio < 2**31 - 1):
            continue
        bias_dq[name] = _emit_const(em, name, b.astype(np.float32), qp, inserted)

    for node in out.graph.node:
        for i, name in enumerate(node.input):
            if (node.name, i) in plan.act_uses and name in act_dq:
                node.input[i] = act_dq[name]
            elif (node.name, i) in plan.weight_uses and name in weight_dq:
                node.input[i] = weight_dq[name]
            elif i == 2 and name in bias_dq and plan.biases[name][2] == node.name:
                node.input[i] = bias_dq[name]

    splice(out.graph, inserted, em.new_inits)
    return out


def splice(
    graph: onnx.GraphProto,
    inserted: dict[str, list[onnx.NodeProto]],
    new_inits: list[onnx.TensorProto],
) -> None:
    """Place each inserted Q/DQ right after the producer of the value it reads (graph
    inputs and initializers first), add the new initializers, drop the unused ones."""
    nodes: list[onnx.NodeProto] = list(inserted.get("", []))
    for node in graph.node:
        nodes.append(node)
        for o in node.output:
            nodes.extend(inserted.get(o, []))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    remove_unused_initializers(graph)


def _emit_const(
    em: Emitter,
    name: str,
    array: np.ndarray,
    qp: QuantParams,
    inserted: dict[str, list[onnx.NodeProto]],
) -> str:
    base = _safe(name)
    q = quantize_affine(array, qp)
    (scale, zp), attrs = em.qparams_inputs(base, qp, array.shape)
    q_name = em.init(base + "_quantized", q)
    dq_name = em.fresh(base + "_dequantized")
    inputs = [q_name, scale] if qp.dtype == np.int32 else [q_name, scale, zp]
    inserted.setdefault("", []).append(
        helper.make_node(
            "DequantizeLinear",
            inputs,
            [dq_name],
            name=em.fresh(base + "_DequantizeLinear"),
            **attrs,
        )  # fmt: skip
    )
    return dq_name


def _safe(name: str) -> str:
    return name.replace("/", "_").replace(":", "_") or "t"
