"""Each quantizer option does what it says, checked on the emitted graph and with ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from quantizer_models import conv_feeds, conv_net, mlp, mlp_feeds, ort_run, sqnr

from qlinear.quantizer import QuantConfig, SensitivityConfig, SmoothQuantConfig, quantize


def _cfg(**kw) -> QuantConfig:
    return QuantConfig(progress=False, **kw)


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _weight_dq(model: onnx.ModelProto, node_name: str, index: int = 1) -> onnx.NodeProto:
    node = next(n for n in model.graph.node if n.name == node_name)
    return next(n for n in model.graph.node if n.output[0] == node.input[index])


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.fixture(scope="module")
def conv_model() -> onnx.ModelProto:
    return conv_net()


def test_default_static_runs_in_ort_and_is_accurate(conv_model) -> None:
    q = quantize(conv_model, conv_feeds(4), _cfg())
    onnx.checker.check_model(q, full_check=True)
    feeds = conv_feeds(1, batch=8, seed=3)[0]
    assert sqnr(ort_run(conv_model, feeds)[0], ort_run(q, feeds)[0]) > 20
    ops = [n.op_type for n in q.graph.node]
    assert "BatchNormalization" not in ops  # folded
    # Relu absorbed: the Conv output feeding Relu is not quantized, the Relu output is,
    # with zero point at qmin (uint8 0) so the Relu is a no-op on quantized values.
    quantized = {n.input[0]: n for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert "bn1" not in quantized and "r1" in quantized
    assert _inits(q)[quantized["r1"].input[2]] == 0


def test_per_channel_asymmetric_weights_have_distinct_zero_points(conv_model) -> None:
    q = quantize(conv_model, conv_feeds(2), _cfg(weight_symmetric=False))
    dq = _weight_dq(q, "pw")
    zp = _inits(q)[dq.input[2]]
    assert zp.shape == (8,) and len(set(zp.tolist())) > 1
    assert _attrs(dq)["axis"] == 0
    feeds = conv_feeds(1, seed=3)[0]
    assert sqnr(ort_run(conv_model, feeds)[0], ort_run(q, feeds)[0]) > 20


def test_per_tensor_and_symmetric_weights(conv_model) -> None:
    q = quantize(conv_model, conv_feeds(2), _cfg(weight_granularity="per_tensor"))
    dq = _weight_dq(q, "pw")
    assert _inits(q)[dq.input[1]].shape == ()
    q = quantize(conv_model, conv_feeds(2), _cfg())
    dq = _weight_dq(q, "pw")
    assert np.all(_inits(q)[dq.input[2]] == 0) and _inits(q)[dq.input[1]].shape == (8,)


def test_bias_is_int32_with_product_scale(conv_model) -> None:
    q = quantize(conv_model, conv_feeds(2), _cfg())
    inits = _inits(q)
    bias_dq = _weight_dq(q, "fc", 2)
    assert inits[bias_dq.input[0]].dtype == np.int32
    x_dq = _weight_dq(q, "fc", 0)
    w_dq = _weight_dq(q, "fc", 1)
    expected = inits[x_dq.input[1]] * inits[w_dq.input[1]]
    np.testing.assert_array_equal(inits[bias_dq.input[1]], expected.astype(np.float32))


@pytest.mark.parametrize("wtype", ["int4", "int8"])
def test_blockwise_weights_scale_shape_and_opset(wtype: str) -> None:
    model = mlp(k=64, n=32)
    q = quantize(model, mlp_feeds(2), _cfg(weight_type=wtype, weight_granularity="blockwise",
                                           block_size=16))  # fmt: skip
    assert q.opset_import[0].version == 21
    dq = _weight_dq(q, "fc1")
    attrs = _attrs(dq)
    assert attrs == {"axis": 0, "block_size": 16}
    inits = _inits(q)
    assert inits[dq.input[1]].shape == (4, 32)
    w_t = next(t for t in q.graph.initializer if t.name == dq.input[0])
    assert w_t.data_type == (TensorProto.INT4 if wtype == "int4" else TensorProto.INT8)
    feeds = mlp_feeds(1, seed=5)[0]
    # ORT 1.32's extended-level MatMulIntegerToFloat fusion mishandles blocked *int8*
    # scales (it fails at run time); the graph itself is valid and runs at basic level.
    out = ort_run(q, feeds, basic=wtype == "int8")[0]
    assert sqnr(ort_run(model, feeds)[0], out) > (15 if wtype == "int4" else 30)


def test_uint8_weights_and_activation_types() -> None:
    model = mlp()
    q = quantize(model, mlp_feeds(2), _cfg(weight_type="uint8"))
    assert _inits(q)[_weight_dq(q, "fc1").input[0]].dtype == np.uint8
    for act, dtype in [("int8", np.int8), ("int16", np.int16), ("uint8", np.uint8)]:
        q = quantize(model, mlp_feeds(2), _cfg(activation_type=act, activation_symmetric=True))
        qnode = next(n for n in q.graph.node if n.op_type == "QuantizeLinear")
        zp = _inits(q)[qnode.input[2]]
        assert zp.dtype == dtype
        feeds = mlp_feeds(1, seed=5)[0]
        assert sqnr(ort_run(model, feeds)[0], ort_run(q, feeds)[0]) > 25


def test_excluded_nodes_and_op_types_stay_float(conv_model) -> None:
    q = quantize(conv_model, conv_feeds(2), _cfg(exclude_nodes=("pw",), exclude_op_types=("Gemm",)))
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    for name in ("pw", "fc"):
        node = next(n for n in q.graph.node if n.name == name)
        assert all(producers.get(i) != "DequantizeLinear" for i in node.input if i), name
    dw = next(n for n in q.graph.node if n.name == "dw")
    assert producers[dw.input[0]] == "DequantizeLinear"


def test_keep_float_tensors(conv_model) -> None:
    q = quantize(conv_model, conv_feeds(2), _cfg(keep_float_tensors=("r2",)))
    assert "r2" not in {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}


@pytest.mark.parametrize("per_token", [False, True])
def test_dynamic_quantization(per_token: bool) -> None:
    model = mlp()
    q = quantize(model, None, QuantConfig(mode="dynamic", dynamic_per_token=per_token))
    ops = [n.op_type for n in q.graph.node]
    if per_token:
        qn = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
        assert len(qn) == 2 and _attrs(qn[0])["block_size"] == 64
        assert "DynamicQuantizeLinear" not in ops
    else:
        assert ops.count("DynamicQuantizeLinear") == 2
    feeds = mlp_feeds(1, seed=5)[0]
    assert sqnr(ort_run(model, feeds)[0], ort_run(q, feeds)[0]) > 30


def test_bias_correction_changes_biases_and_helps(conv_model) -> None:
    calib = conv_feeds(8)
    base = quantize(conv_model, calib, _cfg(weight_granularity="per_tensor"))
    corr = quantize(conv_model, calib,
                    _cfg(weight_granularity="per_tensor", bias_correction=True))  # fmt: skip
    b0 = _inits(base)[_weight_dq(base, "fc", 2).input[0]]
    b1 = _inits(corr)[_weight_dq(corr, "fc", 2).input[0]]
    assert not np.array_equal(b0, b1)
    feeds = conv_feeds(1, batch=16, seed=7)[0]
    ref = ort_run(conv_model, feeds)[0]
    err0 = abs(float(np.mean(ort_run(base, feeds)[0] - ref)))
    err1 = abs(float(np.mean(ort_run(corr, feeds)[0] - ref)))
    assert err1 <= err0 + 1e-3


def test_smoothquant_keeps_float_function_and_scales_weights() -> None:
    from qlinear.quantizer.prepare import prepare
    from qlinear.quantizer.smoothquant import smooth

    model = mlp()
    calib = mlp_feeds(3)
    calib[0]["x"][..., 5] *= 30  # an outlier channel
    cfg = _cfg(smoothquant=SmoothQuantConfig(alpha=0.5))
    smoothed = smooth(prepare(model), lambda: calib, cfg)
    assert any(n.op_type == "Mul" for n in smoothed.graph.node)
    feeds = mlp_feeds(1, seed=5)[0]
    np.testing.assert_allclose(ort_run(smoothed, feeds)[0], ort_run(model, feeds)[0],
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    q = quantize(model, calib, cfg)
    assert sqnr(ort_run(model, feeds)[0], ort_run(q, feeds)[0]) > 20


def test_sensitivity_keeps_worst_layers_float(conv_model) -> None:
    from qlinear.quantizer.plan import GraphIndex
    from qlinear.quantizer.prepare import prepare
    from qlinear.quantizer.sensitivity import rank_layers

    calib = conv_feeds(3)
    q = quantize(conv_model, calib, _cfg(sensitivity=SensitivityConfig(keep_float=1, batches=2)))
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    float_nodes = [
        n.name
        for n in q.graph.node
        if n.op_type in ("Conv", "Gemm") and producers.get(n.input[1]) != "DequantizeLinear"
    ]
    assert len(float_nodes) == 1
    # the ranking is sorted by SQNR, most sensitive first
    from qlinear.calibration import collect
    from qlinear.quantizer.api import _State
    from qlinear.quantizer.plan import candidate_tensors
    from qlinear.runtime import Session

    prepared = prepare(conv_model)
    index = GraphIndex(prepared)
    session = Session(prepared, optimize=False)
    stats, _ = collect(session, calib, candidate_tensors(index), progress=False)
    ranking = rank_layers(prepared, index, _State(_cfg(), stats), calib[:2])
    assert [r.sqnr_db for r in ranking] == sorted(r.sqnr_db for r in ranking)
    assert ranking[0].node == float_nodes[0]


def test_target_sqnr_keeps_layers_float_until_reached(conv_model) -> None:
    calib = conv_feeds(3)
    cfg = _cfg(sensitivity=SensitivityConfig(target_sqnr=200.0, batches=2))
    q = quantize(conv_model, calib, cfg)  # unreachable: everything ends up float
    assert not any(n.op_type == "DequantizeLinear" and n.output[0] in
                   {i for m in q.graph.node if m.op_type == "Conv" for i in m.input}
                   for n in q.graph.node)  # fmt: skip


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_every_calibration_method_runs(conv_model, method: str) -> None:
    q = quantize(conv_model, conv_feeds(2), _cfg(calibration=method))
    feeds = conv_feeds(1, seed=3)[0]
    assert sqnr(ort_run(conv_model, feeds)[0], ort_run(q, feeds)[0]) > 10


def _op_zoo() -> onnx.ModelProto:
    """ConvTranspose, Sigmoid, Resize, MaxPool, AveragePool, Concat, Mul(act, act), Gather."""
    from onnx import helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 2, 2)).astype(np.float32), "Wt"),
        numpy_helper.from_array(np.array([], np.float32), "roi"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        numpy_helper.from_array(rng.normal(0, 1, (10, 16)).astype(np.float32), "table"),
    ]
    nodes = [
        helper.make_node("ConvTranspose", ["x", "Wt"], ["ct"], strides=[2, 2], name="convt"),
        helper.make_node("Sigmoid", ["ct"], ["sg"], name="sigmoid"),
        helper.make_node("Resize", ["x", "roi", "scales"], ["rs"], mode="linear", name="resize"),
        helper.make_node("MaxPool", ["rs"], ["mp"], kernel_shape=[1, 1], name="maxpool"),
        helper.make_node(
            "AveragePool", ["sg"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="avgpool"
        ),  # fmt: skip
        helper.make_node("Concat", ["ap", "mp"], ["cat"], axis=1, name="concat"),
        helper.make_node("Mul", ["cat", "cat"], ["sq"], name="square"),
        helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0, name="embed"),
    ]
    graph = helper.make_graph(
        nodes,
        "ops",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4, 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3]),
        ],  # fmt: skip
        [
            helper.make_tensor_value_info("sq", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("emb", TensorProto.FLOAT, None),
        ],  # fmt: skip
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_op_coverage_quantized_and_runs() -> None:
    model = _op_zoo()
    rng = np.random.default_rng(1)

    def feeds() -> dict:
        return {"x": rng.normal(size=(2, 4, 4, 4)).astype(np.float32),
                "ids": rng.integers(0, 10, (2, 3))}  # fmt: skip

    q = quantize(model, [feeds() for _ in range(3)], _cfg())
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    for name in ("convt", "sigmoid", "avgpool", "concat", "square", "maxpool", "embed"):
        node = next(n for n in q.graph.node if n.name == name)
        assert producers[node.input[0]] == "DequantizeLinear", name
    f = feeds()
    for ref, out in zip(ort_run(model, f), ort_run(q, f), strict=True):
        assert sqnr(ref, out) > 25


def test_sharded_calibration_matches_one_pass(conv_model, tmp_path) -> None:
    from qlinear.calibration import load_stats, merge_all, save_stats
    from qlinear.quantizer import calibrate

    calib = conv_feeds(6)
    shards = [calibrate(conv_model, calib[:2], _cfg()), calibrate(conv_model, calib[2:], _cfg())]
    save_stats(shards[1], str(tmp_path / "shard1.npz"))
    merged = merge_all([shards[0], load_stats(str(tmp_path / "shard1.npz"))])
    assert merged == calibrate(conv_model, calib, _cfg())
    a = quantize(conv_model, None, _cfg(), statistics=merged)
    b = quantize(conv_model, calib, _cfg())
    feeds = conv_feeds(1, seed=3)[0]
    np.testing.assert_array_equal(ort_run(a, feeds)[0], ort_run(b, feeds)[0])
