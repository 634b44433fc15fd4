"""SmoothQuant: move activation outliers of transformer MatMuls into their weights.

For an activation X feeding MatMuls with constant weights W [K, N], per input channel
k: ``s_k = amax(X_k)^a / amax(W_k)^(1-a)``; then ``X' = X / s`` and ``W' = s * W``
(the product is unchanged). When X comes from a LayerNormalization whose output
only feeds those MatMuls, 1/s is folded into its scale and bias; otherwise one
``Mul(X, 1/s)`` is inserted, shared by all the MatMuls reading X. The factor is an
activation-space [K] vector applied to weight rows: reshaped [K, 1] (design §1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qlinear.calibration import collect
from qlinear.quantizer.plan import GraphIndex


def smooth(
    model: onnx.ModelProto,
    data: Callable[[], Iterable[Mapping[str, np.ndarray]]],
    config: object,
) -> onnx.ModelProto:
    """A smoothed copy of `model` (one calibration pass for per-channel activation maxima)."""
    from qlinear.runtime import Session

    alpha = float(config.smoothquant.alpha)  # type: ignore[attr-defined]
    excluded_nodes = set(getattr(config, "exclude_nodes", ()))
    index = GraphIndex(model)
    groups = _groups(index, excluded_nodes)
    if not groups:
        return model
    _, channels = collect(
        Session(model, optimize=False), data(), (), channel_tensors=dict.fromkeys(groups, -1),
        progress=getattr(config, "progress", True),
    )  # fmt: skip
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = GraphIndex(out)
    node_by_name = {n.name: n for n in out.graph.node}
    inits = {t.name: t for t in out.graph.initializer}
    new_nodes: dict[str, onnx.NodeProto] = {}
    for x, consumers in groups.items():
        stats = channels.get(x)
        if stats is None or stats.absmax is None:
            continue
        weights = [index.array(node_by_name[c].input[1]) for c in consumers]
        w_amax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        x_amax = stats.absmax
        if x_amax.shape != w_amax.shape:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.power(x_amax, alpha) / np.power(w_amax, 1 - alpha)
        s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
        s = np.clip(s, 1e-5, 1e5)
        for c in consumers:
            node = node_by_name[c]
            w = index.array(node.input[1]) * s.reshape(-1, 1)  # [K, 1] along weight rows
            name = _unique(out, node.input[1] + "_smoothed")
            out.graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), name))
            node.input[1] = name
        if not _fold_into_layernorm(index, inits, x, consumers, s):
            inv = _unique(out, x + "_smooth_scale")
            out.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
            y = _unique(out, x + "_smoothed")
            mul = helper.make_node("Mul", [x, inv], [y], name=_unique(out, x + "_SmoothQuant"))
            new_nodes[x] = mul
            for c in consumers:
                node_by_name[c].input[0] = y
    if new_nodes:
        nodes = []
        graph_inputs = {i.name for i in out.graph.input}
        nodes.extend(m for x, m in new_nodes.items() if x in graph_inputs)
        for node in out.graph.node:
            nodes.append(node)
            nodes.extend(new_nodes[o] for o in node.output if o in new_nodes)
        del out.graph.node[:]
        out.graph.node.extend(nodes)
    from qlinear.quantizer.prepare import infer_shapes, remove_unused_initializers

    remove_unused_initializers(out.graph)
    return infer_shapes(out)


def _groups(index: GraphIndex, excluded: set[str]) -> dict[str, list[str]]:
    """Activation -> MatMul nodes reading it with a constant 2-D weight (all of them)."""
    groups: dict[str, list[str]] = {}
    for node in index.nodes:
        if node.op_type != "MatMul" or node.name in excluded:
            continue
        x, w = node.input[0], node.input[1]
        if index.activation(x) and index.is_const(w) and index.array(w).ndim == 2:
            groups.setdefault(x, []).append(node.name)
    return groups


def _fold_into_layernorm(
    index: GraphIndex,
    inits: dict[str, onnx.TensorProto],
    x: str,
    consumers: list[str],
    s: np.ndarray,
) -> bool:
    ln = index.producer.get(x)
    if ln is None or ln.op_type != "LayerNormalization" or x in index.outputs:
        return False
    if {n.name for n in index.consumers.get(x, [])} != set(consumers):
        return False
    params = [n for n in ln.input[1:3] if n]
    if not params or not all(n in inits for n in params):
        return False
    if any(len(index.consumers.get(n, [])) != 1 for n in params):
        return False
    for n in params:
        value = numpy_helper.to_array(inits[n])
        if value.shape != s.shape:
            return False
    for n in params:
        value = numpy_helper.to_array(inits[n]) / s
        inits[n].CopyFrom(numpy_helper.from_array(value.astype(np.float32), n))
    return True


def _unique(model: onnx.ModelProto, base: str) -> str:
    used = {t.name for t in model.graph.initializer} | {n.name for n in model.graph.node}
    used |= {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    name, k = base, 0
    while name in used:
        k += 1
        name = f"{base}_{k}"
    return name
