"""Messy exports and wrong inputs: clear errors or documented behaviour."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from quantizer_models import conv_feeds, conv_net, messy_attention, messy_feeds, ort_run, sqnr

from qlinear.errors import InputError, QlinearError
from qlinear.quantizer import QuantConfig, quantize
from qlinear.quantizer.prepare import AlreadyQuantizedError

CFG = QuantConfig(progress=False)


def test_messy_opset11_export_quantizes_and_runs_in_ort() -> None:
    model = messy_attention(opset=11)
    before = model.SerializeToString()
    q = quantize(model, messy_feeds(6), CFG)
    assert model.SerializeToString() == before  # the caller's model is untouched
    assert q.opset_import[0].version == 13
    onnx.checker.check_model(q, full_check=True)
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    # weights held in Constant nodes are quantized as weights (int8 initializers + DQ)
    weight_dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear"
                  and n.input[0].startswith("W")]  # fmt: skip
    assert len(weight_dqs) >= 3
    # the float32-lowest mask arithmetic stays float; the softmax output is quantized
    assert not quantized & {"bias0", "bias", "masked", "inv"}
    assert "probs" in quantized
    # Gemm bias [1, N] became an int32 per-channel bias
    head = next(n for n in q.graph.node if n.name == "head")
    bias = next(n for n in q.graph.node if n.output[0] == head.input[2])
    assert numpy_helper.to_array(
        next(t for t in q.graph.initializer if t.name == bias.input[0])
    ).shape == (4,)
    for batch, seq in [(1, 3), (3, 9)]:  # dynamic batch and sequence
        feeds = messy_feeds(1, batch=batch, seq=seq, seed=11)[0]
        ref, out = ort_run(model, feeds)[0], ort_run(q, feeds)[0]
        assert np.all(np.isfinite(out)) and sqnr(ref, out) > 15


def test_finite_additive_mask_stays_float() -> None:
    """A -10000 mask is no sentinel, but it is computed from the integer mask input only."""
    model = messy_attention(opset=11, mask_value=-10000.0)
    q = quantize(model, messy_feeds(6), CFG)
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert not quantized & {"bias0", "bias", "masked", "inv"}
    feeds = messy_feeds(1, seed=11)[0]
    assert sqnr(ort_run(model, feeds)[0], ort_run(q, feeds)[0]) > 15


def test_data_movement_shares_input_params() -> None:
    q = quantize(messy_attention(), messy_feeds(4), CFG)
    qnodes = {n.input[0]: n for n in q.graph.node if n.op_type == "QuantizeLinear"}
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    k, kt = qnodes["k"], qnodes["kt"]  # kt = Transpose(k)
    assert inits[k.input[1]] == inits[kt.input[1]] and inits[k.input[2]] == inits[kt.input[2]]


def test_model_given_as_path_and_bytes(tmp_path) -> None:
    model = conv_net()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    data = path.read_bytes()
    a = quantize(path, conv_feeds(2), CFG)
    b = quantize(data, conv_feeds(2), CFG)
    assert path.read_bytes() == data
    feeds = conv_feeds(1, seed=4)[0]
    np.testing.assert_array_equal(ort_run(a, feeds)[0], ort_run(b, feeds)[0])


def test_already_quantized_model_is_refused() -> None:
    q = quantize(conv_net(), conv_feeds(2), CFG)
    with pytest.raises(AlreadyQuantizedError, match="already quantized"):
        quantize(q, conv_feeds(2), CFG)


def test_empty_calibration_data() -> None:
    with pytest.raises(InputError, match="empty"):
        quantize(conv_net(), [], CFG)
    with pytest.raises(ValueError, match="needs calibration_data"):
        quantize(conv_net(), None, CFG)


@pytest.mark.parametrize(
    "feeds, match",
    [
        ({"image": np.zeros((1, 3, 8, 8), np.float32)}, "batch 0: unknown input 'image'"),
        ({"x": np.zeros((1, 3, 9, 8), np.float32)}, "batch 0: input 'x' has shape"),
        ({"x": np.zeros((1, 3, 8, 8), np.float64)}, "batch 0: input 'x' has dtype float64"),
        ({}, "batch 0: missing input"),
    ],
)
def test_wrong_calibration_feeds(feeds, match) -> None:
    with pytest.raises(InputError, match=match):
        quantize(conv_net(), [feeds], CFG)


def test_calibration_batch_not_a_dict() -> None:
    with pytest.raises(InputError, match="batch 0 is a ndarray"):
        quantize(conv_net(), [np.zeros(3)], CFG)


def test_one_shot_iterator_refused_when_data_is_read_twice() -> None:
    from qlinear.quantizer import SmoothQuantConfig

    cfg = QuantConfig(progress=False, smoothquant=SmoothQuantConfig())
    with pytest.raises(QlinearError, match="more than once"):
        quantize(messy_attention(), iter(messy_feeds(2)), cfg)
    quantize(messy_attention(), lambda: iter(messy_feeds(2)), cfg)  # a callable is fine


def test_zero_range_tensor_is_exact() -> None:
    """A tensor that is constant over the data (here x * 0 + 2.5) quantizes to its value."""
    nodes = [
        helper.make_node("Mul", ["x", "zero"], ["z"], name="mul0"),
        helper.make_node("Add", ["z", "c"], ["k"], name="add_c"),
        helper.make_node("Add", ["k", "x"], ["y"], name="add_x"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(np.array(2.5, np.float32), "c"),
        ],  # fmt: skip
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    calib = [{"x": rng.normal(size=(2, 4)).astype(np.float32)} for _ in range(3)]
    q = quantize(model, calib, CFG)
    qk = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "k")
    scale = numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == qk.input[1]))
    assert np.isclose(scale * 255, 2.5)
    feeds = {"x": rng.normal(size=(2, 4)).astype(np.float32)}
    assert sqnr(ort_run(model, feeds)[0], ort_run(q, feeds)[0]) > 30


def test_all_zero_tensor_gets_unit_scale() -> None:
    nodes = [helper.make_node("Mul", ["x", "zero"], ["z"], name="mul0"),
             helper.make_node("Add", ["z", "x"], ["y"], name="add")]  # fmt: skip
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib = [{"x": np.ones((2, 4), np.float32)}]
    q = quantize(model, calib, CFG)
    qz = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "z")
    scale = numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == qz.input[1]))
    assert scale == 1.0
    np.testing.assert_allclose(ort_run(q, calib[0])[0], ort_run(model, calib[0])[0], atol=0.01)


def test_bad_config_values() -> None:
    with pytest.raises(ValueError, match="weight_type"):
        QuantConfig(weight_type="int3")
    with pytest.raises(ValueError, match="calibration"):
        QuantConfig(calibration="kl")
