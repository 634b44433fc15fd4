"""The error a layer adds on its own: model B with every matched layer fed float inputs.

To measure one layer's own error we run B's version of the layer on model A's
(float) values of its inputs and compare with A's output. Instead of extracting
one sub-graph per layer, we cut B once at every matched value: each consumer of a
matched value reads a new graph input ``qlinear.float:<key>`` instead, fed with A's
value of that key. Every producer of a matched value then computes it from exact
float inputs, so one run of the cut model yields all layers' own outputs.

What "own" contains: in a QDQ graph the cut sits at the DequantizeLinear output,
so a layer's own error is its weight quantization, its integer arithmetic and
the quantization of its *output*; each activation's rounding is counted once, at
the layer that produces it. A fused int8 value (no float carrier) is cut by
quantizing A's value with the tensor's own scale, so there the next layer's own
error also holds that input's rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from onnx import helper, numpy_helper

from qlinear.report.matching import LayerMatch

FEED_PREFIX = "qlinear.float:"


def isolate(
    model_b: onnx.ModelProto, matches: Sequence[LayerMatch]
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The cut copy of `model_b` and its new inputs as {input name: A key}."""
    cut = onnx.ModelProto()
    cut.CopyFrom(model_b)
    graph = cut.graph
    graph_inputs = {vi.name for vi in graph.input}
    feeds: dict[str, str] = {}
    extra_nodes: list[onnx.NodeProto] = []
    for match in matches:
        ref = match.b
        if ref.name in graph_inputs:
            continue  # fed with the batch itself, already exact
        consumers = [n for n in graph.node if ref.name in n.input]
        if not consumers:
            continue
        feed = FEED_PREFIX + match.key
        source = feed
        if ref.scale is not None:
            source = feed + "/quantized"
            scale_name, zp_name = feed + "/scale", feed + "/zero_point"
            graph.initializer.append(numpy_helper.from_array(ref.scale, scale_name))
            inputs = [feed, scale_name]
            if ref.zero_point is not None:
                graph.initializer.append(numpy_helper.from_array(ref.zero_point, zp_name))
                inputs.append(zp_name)
            extra_nodes.append(
                helper.make_node(
                    "QuantizeLinear", inputs, [source], name=feed + "/Quantize", axis=ref.axis
                )
            )
        for node in consumers:
            for i, name in enumerate(node.input):
                if name == ref.name:
                    node.input[i] = source
        graph.input.append(helper.make_tensor_value_info(feed, onnx.TensorProto.FLOAT, None))
        feeds[feed] = match.key
    if extra_nodes:
        nodes = list(extra_nodes) + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    return cut, feeds
