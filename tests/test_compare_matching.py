"""Per-layer matching and compare on zoo-like models: float vs QDQ, QDQ vs fused."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qlinear import zoo
from qlinear.report import compare
from qlinear.report.matching import REPLACES_KEY, match_layers

OPSET = 19  # DequantizeLinear-19 has an onnx.reference fallback on every runtime path


def _quantize(model: onnx.ModelProto, tmp_path, samples: list[np.ndarray]) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"pixel_values": s} for s in samples])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.items, None)

    src, dst = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(model, src)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ)
    return onnx.load(dst)


@pytest.fixture(scope="module")
def resnet_pair(tmp_path_factory):
    model = zoo.build("resnet", "small", opset=OPSET)
    rng = np.random.default_rng(1)
    calib = [rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(4)]
    qdq = _quantize(model, tmp_path_factory.mktemp("q"), calib)
    data = {"pixel_values": rng.standard_normal((4, 3, 32, 32)).astype(np.float32)}
    return model, qdq, data


def test_float_vs_qdq_pairs_are_the_quantized_activations(resnet_pair):
    model, qdq, _ = resnet_pair
    matches = {m.key: m for m in match_layers(model, qdq)}
    float_outputs = {o for n in model.graph.node for o in n.output}
    producers = {o: n for n in qdq.graph.node for o in n.output}
    assert len(matches) >= 20
    for key, m in matches.items():
        assert key in float_outputs or key == "pixel_values"
        assert m.a.name == key
        if m.b.name != key:  # carried by a DQ whose Q quantizes the same float tensor
            dq = producers[m.b.name]
            assert dq.op_type == "DequantizeLinear"
            assert producers[dq.input[0]].op_type == "QuantizeLinear"
    conv = matches["/layer1.0/conv1/Conv_output_0"]
    assert conv.op_a == conv.op_b == "Conv" and conv.how == "name"
    assert conv.inputs == ("/MaxPool_output_0",)
    # ORT renames the Gemm output it quantizes; graph position still finds it
    assert matches["logits"].op_b == "Gemm"
    assert not any(k.endswith("weight") or k.endswith("bias") for k in matches)


def test_renamed_tensor_is_matched_by_structure(resnet_pair):
    model, qdq, _ = resnet_pair
    renamed = onnx.ModelProto()
    renamed.CopyFrom(qdq)
    old = "/layer1.0/conv1/Conv_output_0"
    for node in renamed.graph.node:
        node.output[:] = ["renamed_conv" if o == old else o for o in node.output]
        node.input[:] = ["renamed_conv" if i == old else i for i in node.input]
    matches = {m.key: m for m in match_layers(model, renamed)}
    assert matches[old].how == "structure" and matches[old].key_b == "renamed_conv"


def test_identical_models_are_exact(resnet_pair):
    _, qdq, data = resnet_pair
    result = compare(qdq, qdq, data, batch_size=2)
    assert result.batches == 2 and result.samples == 4
    assert all(o.stats.exact and o.stats.sqnr_db == math.inf for o in result.outputs)
    assert result.outputs[0].stats.top1 == 1.0
    assert result.layers and all(r.own.exact and r.accumulated.exact for r in result.layers)
    assert result.to_dict()["outputs"][0]["sqnr_db"] == "inf"


def test_injected_error_is_reported_at_its_layer_first(resnet_pair):
    model, qdq, data = resnet_pair
    broken = onnx.ModelProto()
    broken.CopyFrom(qdq)
    target = "/layer2.0/conv1/Conv_output_0"
    (dq,) = [
        n
        for n in broken.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] == target + "_QuantizeLinear_Output"
    ]
    scale = numpy_helper.to_array(
        next(t for t in broken.graph.initializer if t.name == dq.input[1])
    )
    broken.graph.initializer.append(numpy_helper.from_array(scale * 1.5, "broken_scale"))
    dq.input[1] = "broken_scale"
    result = compare(model, broken, data, batch_size=4)
    worst = result.worst_layers(3)
    assert worst[0].name == target
    assert worst[0].own.sqnr_db < 15 < worst[1].own.sqnr_db
    clean = {r.name: r for r in compare(model, qdq, data, batch_size=4).layers}
    assert clean[target].own.sqnr_db > 25
    # downstream layers inherit the error (accumulated) but do not add it (own)
    after = {r.name: r for r in result.layers}["/layer2.0/conv2/Conv_output_0"]
    assert after.accumulated.sqnr_db < clean[after.name].accumulated.sqnr_db - 3
    assert after.own.sqnr_db == pytest.approx(clean[after.name].own.sqnr_db, abs=0.5)


def test_float_vs_qdq_on_onnxruntime_engine(resnet_pair):
    model, qdq, data = resnet_pair
    ort = compare(model, qdq, data, batch_size=4, engine_a="onnxruntime", engine_b="onnxruntime")
    ql = compare(model, qdq, data, batch_size=4)
    assert 10 < ort.outputs[0].stats.sqnr_db < 60
    assert ort.outputs[0].stats.sqnr_db == pytest.approx(ql.outputs[0].stats.sqnr_db, abs=1.0)
    assert [r.name for r in ort.layers] == [r.name for r in ql.layers]


# -- QDQ vs a hand-"optimized" graph with fused nodes mapped by qlinear.replaces ------------


def _qdq_and_fused() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """x -> MatMul(W1) -> h -> MatMul(W2) -> y, as QDQ and as two fused QLinearMatMuls."""
    rng = np.random.default_rng(0)
    w1 = rng.integers(-100, 100, (8, 6), dtype=np.int8)
    w2 = rng.integers(-100, 100, (6, 4), dtype=np.int8)
    consts = {
        "x_s": np.float32(0.02), "x_z": np.uint8(128), "h_s": np.float32(0.5),
        "h_z": np.uint8(128), "y_s": np.float32(4.0), "y_z": np.uint8(128),
        "w1": w1, "w1_s": np.float32(0.01), "w1_z": np.int8(0),
        "w2": w2, "w2_s": np.float32(0.01), "w2_z": np.int8(0),
    }  # fmt: skip
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    mk = helper.make_node
    qdq_nodes = [
        mk("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
        mk("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
        mk("DequantizeLinear", ["w1", "w1_s", "w1_z"], ["w1d"]),
        mk("MatMul", ["xd", "w1d"], ["h"], name="mm1"),
        mk("QuantizeLinear", ["h", "h_s", "h_z"], ["hq"]),
        mk("DequantizeLinear", ["hq", "h_s", "h_z"], ["hd"]),
        mk("DequantizeLinear", ["w2", "w2_s", "w2_z"], ["w2d"]),
        mk("MatMul", ["hd", "w2d"], ["y_f"], name="mm2"),
        mk("QuantizeLinear", ["y_f", "y_s", "y_z"], ["yq"]),
        mk("DequantizeLinear", ["yq", "y_s", "y_z"], ["y"]),
    ]
    fused1 = mk(
        "QLinearMatMul",
        ["xq", "x_s", "x_z", "w1", "w1_s", "w1_z", "h_s", "h_z"],
        ["t0"],  # renamed output, int8, no DQ after it: read through its own scale
        name="fused1",
    )
    fused1.metadata_props.add(key=REPLACES_KEY, value="h")
    fused2 = mk(
        "QLinearMatMul",
        ["t0", "h_s", "h_z", "w2", "w2_s", "w2_z", "y_s", "y_z"],
        ["t1"],
        name="fused2",
        doc_string=f"{REPLACES_KEY}=y_f",
    )
    fused_nodes = [
        mk("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
        fused1,
        fused2,
        mk("DequantizeLinear", ["t1", "y_s", "y_z"], ["y"]),
    ]
    opsets = [helper.make_opsetid("", OPSET)]
    qdq = helper.make_model(
        helper.make_graph(qdq_nodes, "qdq", [x], [y], inits), opset_imports=opsets
    )
    fused = helper.make_model(
        helper.make_graph(fused_nodes, "fused", [x], [y], inits), opset_imports=opsets
    )
    return qdq, fused


def test_fused_nodes_map_back_through_replaces():
    qdq, fused = _qdq_and_fused()
    matches = {m.key: m for m in match_layers(qdq, fused)}
    assert set(matches) == {"x", "h", "y_f"}
    assert matches["h"].how == "replaces" and matches["h"].op_b == "QLinearMatMul"
    assert matches["h"].a.name == "hd" and matches["h"].b.name == "t0"
    assert matches["h"].b.scale is not None  # dequantized with the node's own y scale
    assert matches["y_f"].b.name == "y" and matches["y_f"].inputs == ("h",)
    x = np.random.default_rng(3).uniform(-2, 2, (6, 2, 8)).astype(np.float32)
    result = compare(qdq, fused, [{"x": x.reshape(12, 8)}], batch_size=2)
    layers = {r.name: r for r in result.layers}
    # the fused graph computes the same integers: every tensor agrees to rounding
    assert result.outputs[0].stats.sqnr_db > 40
    assert layers["h"].accumulated.sqnr_db > 40 and layers["y_f"].own.sqnr_db > 40


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_float_vs_fused_int8_model_never_pairs_tensors_of_another_layout(layout):
    """An NHWC value can have an NCHW tensor's shape (C == H == W): the layout pass tags
    its producers and compare leaves them out instead of reporting nonsense errors."""
    import qlinear

    model = zoo.build("resnet", "small")
    calib = zoo.calibration_batches("resnet", model, n=4, batch=4)
    fused = qlinear.optimize(qlinear.quantize(model, calib), layout=layout)
    data = zoo.example_inputs("resnet", model, batch=8, seed=3)
    result = compare(model, fused, data, batch_size=4)
    assert result.outputs[0].stats.sqnr_db > 20
    layers = [r for r in result.layers if r.match.how != "name" or r.match.key != "pixel_values"]
    assert all(r.own.sqnr_db > 20 and r.accumulated.sqnr_db > 15 for r in layers)
    if layout == "nchw":
        assert len(layers) >= 10, "fused NCHW nodes map back through qlinear.replaces"


def test_fused_matmul_weights_with_per_column_scales_resolve_along_their_output_axis():
    """A fused MatMul weight [K, N] with per-column scales [N] dequantizes along axis 1.
    Resolved along axis 0 it broadcast [N, 1] against [K, N]: a crash, or for square
    weights silently per-row scales."""
    import qlinear

    model = zoo.build("bert", "small")
    calib = zoo.calibration_batches("bert", model, n=2, batch=2)
    fused = qlinear.optimize(qlinear.quantize(model, calib))
    inits = {i.name: numpy_helper.to_array(i) for i in fused.graph.initializer}
    data = zoo.example_inputs("bert", model, batch=2, seed=3)
    result = compare(model, fused, data, batch_size=2)
    wants = []
    for node in fused.graph.node:
        if node.op_type == "MatMulIntegerToFloat" and node.input[1] in inits:
            q, scale, zp = (inits[node.input[i]] for i in (1, 3, 5))
            assert scale.shape == (q.shape[1],)
            wants.append((q.astype(np.float32) - zp.astype(np.float32)) * scale)
    weighted = [r.weight for r in result.layers if r.weight is not None]
    assert len(wants) >= 4
    for want in wants:  # every fused linear layer's weight, resolved per output column
        found = [w for w in weighted
                 if w.values.shape == want.shape and np.array_equal(w.values, want)]
        assert found and all(w.per_channel and w.channel_axis == 1 for w in found)


def test_a_gather_table_is_not_judged_as_a_weight_with_output_channels():
    """An embedding table's rows are not output channels: a zero padding row made the
    per-channel rule report an infinite spread for the Gather."""
    from qlinear.report.matching import build_view, layer_weight

    table = np.random.default_rng(0).integers(-100, 100, (6, 4)).astype(np.int8)
    table[0] = 0  # the padding row
    nodes = [
        helper.make_node("DequantizeLinear", ["t_q", "t_s", "t_z"], ["t"]),
        helper.make_node("Gather", ["t", "ids"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [numpy_helper.from_array(table, "t_q"),
         numpy_helper.from_array(np.float32(0.1), "t_s"),
         numpy_helper.from_array(np.int8(0), "t_z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    assert layer_weight(build_view(model), "y") is None
