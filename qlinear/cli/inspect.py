"""`qlinear inspect MODEL`: what is in a model and how qlinear would run it."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from qlinear.errors import QlinearError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="ops, quantization parameters, and which ops fall back")
    p.add_argument("model", help="path to an .onnx model")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from qlinear.onnx_io import load_model

    model = load_model(args.model)
    info = inspect_model(model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(
        f"{args.model}: IR {info['ir_version']}, opsets {info['opsets']}, "
        f"{info['nodes']} nodes, {info['parameters']:,} weight elements"
    )
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            print(f"  {kind[:-1]} {t['name']}: {t['dtype']} {t['shape']}")
    print("ops:")
    for row in info["ops"]:
        print(f"  {row['count']:5d}  {row['op']:<36} {row['runs_in']}")
    if info["quantization"]:
        print("quantization parameters:")
        for row in info["quantization"]:
            print(f"  {row['count']:5d}  {row['op']:<18} {row['dtype']:<7} {row['granularity']}")
    slow = [r["op"] for r in info["ops"] if r["runs_in"] == "onnx.reference (slow)"]
    missing = [r["op"] for r in info["ops"] if r["runs_in"] == "unsupported"]
    print("falls back to onnx.reference: " + (", ".join(slow) or "nothing"))
    if missing:
        print("cannot run (no implementation): " + ", ".join(missing))
    return 0


def inspect_model(model: onnx.ModelProto) -> dict[str, Any]:
    """A JSON-ready summary: I/O, ops by count with where each runs, quant params by kind."""
    from qlinear.runtime.session import inferred_types

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    types = inferred_types(model)
    counts = Counter((n.domain, n.op_type) for n in graph.node)
    ops = [
        {
            "op": f"{d}.{t}" if d not in ("", "ai.onnx") else t,
            "count": c,
            "runs_in": _runs_in(model, d, t),
        }
        for (d, t), c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    return {
        "ir_version": model.ir_version,
        "opsets": opsets,
        "nodes": len(graph.node),
        "parameters": int(sum(int(np.prod(t.dims)) for t in graph.initializer)),
        "inputs": [_io(vi) for vi in graph.input if vi.name not in inits],
        "outputs": [_io(vi) for vi in graph.output],
        "ops": ops,
        "quantization": _quant_summary(graph, inits, types),
    }


def _io(vi: onnx.ValueInfoProto) -> dict[str, Any]:
    t = vi.type.tensor_type
    dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower() if t.elem_type else "?"
    shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim]
    return {"name": vi.name, "dtype": dtype, "shape": shape}


def _runs_in(model: onnx.ModelProto, domain: str, op_type: str) -> str:
    from qlinear.runtime.fallback import reference_kernel
    from qlinear.runtime.registry import NodeSpec, lookup, normalize_domain

    opsets = {normalize_domain(o.domain): o.version for o in model.opset_import}
    opset = opsets.get(normalize_domain(domain), 1)
    if lookup(domain, op_type, opset) is not None:
        return "qlinear"
    node = next(n for n in model.graph.node if n.domain == domain and n.op_type == op_type)
    if reference_kernel(NodeSpec(node, opset), opsets, list(model.functions)) is not None:
        return "onnx.reference (slow)"
    return "unsupported"


_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def _quant_summary(
    graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto], types: dict[str, Any]
) -> list[dict[str, Any]]:
    """Q/DQ nodes grouped by op, quantized dtype and granularity (derived as in qlinear.quant)."""
    rows: Counter[tuple[str, str, str]] = Counter()
    for node in graph.node:
        if node.op_type not in _QDQ_OPS or node.input[1] not in inits:
            continue
        scale = numpy_helper.to_array(inits[node.input[1]])
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zp = numpy_helper.to_array(inits[zp_name]) if zp_name in inits else None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        q_value = node.input[0] if node.op_type == "DequantizeLinear" else node.output[0]
        shape = types.get(q_value, (None, None))[1]
        dtype = str(zp.dtype) if zp is not None else "uint8"
        if "output_dtype" in attrs and zp is None and attrs["output_dtype"]:
            dtype = onnx.TensorProto.DataType.Name(attrs["output_dtype"]).lower()
        if node.input[0] in inits:
            weight = inits[node.input[0]]
            shape = tuple(weight.dims)
            dtype = onnx.TensorProto.DataType.Name(weight.data_type).lower()
        label = _granularity_label(scale, zp, attrs, shape)
        rows[(node.op_type, dtype, label)] += 1
    return [
        {"op": op, "dtype": dt, "granularity": g, "count": c}
        for (op, dt, g), c in sorted(rows.items(), key=lambda kv: (-kv[1], kv[0]))
    ]


def _granularity_label(
    scale: np.ndarray, zp: np.ndarray | None, attrs: dict[str, Any], shape: Any
) -> str:
    from qlinear.quant import PerAxis, PerGroup, PerTensor, from_onnx

    axis = attrs.get("axis", 1)
    block = attrs.get("block_size") or None
    if scale.size == 1:
        return "per-tensor"
    if shape is None or any(not isinstance(d, int) for d in shape):
        return f"blockwise (axis {axis}, block {block})" if block else f"per-channel (axis {axis})"
    try:
        g = from_onnx(scale, zp, shape, axis=axis, block_size=block).granularity(shape)
    except QlinearError as exc:
        return f"invalid: {exc}"
    if isinstance(g, PerTensor):
        return "per-tensor"
    if isinstance(g, PerAxis):
        return f"per-channel (axis {g.axis})"
    if isinstance(g, PerGroup):
        return f"blockwise (axis {g.axis}, block {g.group_size})"
    return f"blockwise {g}"
