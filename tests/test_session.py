"""Session behaviour: planning, feeds validation, fallback listing, errors naming the culprit."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qlinear
from qlinear.errors import InputError, InvalidModelError, UnsupportedOpError


def _model(nodes, inputs, outputs, inits=(), opset=17, ir=None):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir is not None:
        model.ir_version = ir
    return model


def _floor_model():
    return _model(
        [helper.make_node("Floor", ["x"], ["y"], name="floor0")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )


def test_op_without_native_kernel_runs_through_reference_and_is_listed() -> None:
    session = qlinear.Session(_floor_model())
    (y,) = session.run(None, {"x": np.array([[1.5, -1.5, 0.2]], np.float32)})
    np.testing.assert_array_equal(y, [[1.0, -2.0, 0.0]])
    assert session.fallback_ops == ["Floor"]


def test_accepts_path_bytes_and_proto(tmp_path) -> None:
    model = _floor_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    x = {"x": np.ones((2, 3), np.float32)}
    for source in (model, model.SerializeToString(), path, str(path)):
        assert qlinear.Session(source).run(None, x)[0].shape == (2, 3)


def test_get_inputs_and_outputs_describe_the_graph() -> None:
    session = qlinear.Session(_floor_model())
    (inp,) = session.get_inputs()
    assert (inp.name, inp.dtype, inp.shape, inp.type) == (
        "x",
        np.float32,
        ("N", 3),
        "tensor(float)",
    )
    assert [o.name for o in session.get_outputs()] == ["y"]


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"z": np.ones((1, 3), np.float32)}, "unknown input 'z'"),
        ({}, "missing input(s) 'x'"),
        ({"x": np.ones((1, 3), np.float64)}, "input 'x' has dtype float64"),
        ({"x": np.ones((1, 4), np.float32)}, "input 'x' has shape (1, 4)"),
        ({"x": np.ones((3,), np.float32)}, "input 'x' has shape (3,)"),
    ],
)
def test_bad_feeds_name_the_input(feeds, message) -> None:
    session = qlinear.Session(_floor_model())
    with pytest.raises(InputError) as info:
        session.run(None, feeds)
    assert message in str(info.value)


def test_unknown_output_name_is_an_input_error() -> None:
    session = qlinear.Session(_floor_model())
    with pytest.raises(InputError, match="unknown output 'nope'"):
        session.run(["nope"], {"x": np.ones((1, 3), np.float32)})


def test_unknown_op_without_reference_is_refused_at_creation() -> None:
    model = _model(
        [helper.make_node("Frobnicate", ["x"], ["y"], name="frob", domain="acme")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model.opset_import.append(helper.make_opsetid("acme", 1))
    with pytest.raises(UnsupportedOpError, match=r"node 'frob' \(acme.Frobnicate\)"):
        qlinear.Session(model)


def test_dangling_input_is_named() -> None:
    model = _model(
        [helper.make_node("Floor", ["ghost"], ["y"], name="f")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    with pytest.raises(InvalidModelError, match="'ghost'"):
        qlinear.Session(model)


def test_cycle_is_reported() -> None:
    model = _model(
        [
            helper.make_node("Floor", ["b"], ["a"], name="n1"),
            helper.make_node("Ceil", ["a"], ["b"], name="n2"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
    )
    with pytest.raises(InvalidModelError, match="cycle"):
        qlinear.Session(model)


def test_nodes_out_of_order_are_sorted() -> None:
    model = _model(
        [
            helper.make_node("Ceil", ["a"], ["y"], name="second"),
            helper.make_node("Floor", ["x"], ["a"], name="first"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    (y,) = qlinear.Session(model).run(None, {"x": np.array([1.5, -0.5], np.float32)})
    np.testing.assert_array_equal(y, [1.0, -1.0])


def test_constant_subgraphs_are_folded_at_plan_time() -> None:
    w = numpy_helper.from_array(np.array([1.7, -2.2], np.float32), "w")
    model = _model(
        [
            helper.make_node("Floor", ["w"], ["wf"], name="fold_me"),
            helper.make_node("Ceil", ["x"], ["xc"], name="keep"),
            helper.make_node("Max", ["xc", "wf"], ["y"], name="max"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        inits=[w],
    )
    session = qlinear.Session(model)
    assert [s.spec.name for s in session._steps] == ["keep", "max"]
    (y,) = session.run(None, {"x": np.array([-5.0, -5.0], np.float32)})
    np.testing.assert_array_equal(y, [1.0, -3.0])


def test_initializer_listed_as_input_can_be_overridden() -> None:
    w = numpy_helper.from_array(np.array([1.5], np.float32), "w")
    model = _model(
        [helper.make_node("Floor", ["w"], ["wf"]), helper.make_node("Max", ["x", "wf"], ["y"])],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        inits=[w],
        ir=3,
        opset=9,
    )
    session = qlinear.Session(model)
    assert [i.name for i in session.get_inputs()] == ["x"]
    x = np.array([-9.0], np.float32)
    assert session.run(None, {"x": x})[0].tolist() == [1.0]
    assert session.run(None, {"x": x, "w": np.array([7.5], np.float32)})[0].tolist() == [7.0]
    assert session.run(None, {"x": x})[0].tolist() == [1.0]


def test_node_failure_names_node_and_shapes() -> None:
    model = _model(
        [helper.make_node("Max", ["x", "z"], ["y"], name="bad_max")],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, None),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    session = qlinear.Session(model)
    with pytest.raises(qlinear.NodeExecutionError, match=r"node 'bad_max' \(Max\).*\[3\].*\[4\]"):
        session.run(None, {"x": np.ones(3, np.float32), "z": np.ones(4, np.float32)})


def test_the_callers_model_is_not_modified() -> None:
    model = _floor_model()
    before = model.SerializeToString()
    qlinear.Session(model).run(None, {"x": np.ones((1, 3), np.float32)})
    assert model.SerializeToString() == before


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_a_lookup_reads_its_small_integer_indices_without_the_cast(dtype) -> None:
    table = np.random.default_rng(0).normal(size=256).astype(np.float32)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    model = _model(
        [
            helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT32),
            helper.make_node("Gather", ["t", "i"], ["y"], axis=0),
        ],
        [helper.make_tensor_value_info("x", elem, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
        [numpy_helper.from_array(table, "t")],
    )
    x = np.arange(-128, 128).astype(np.int64).astype(dtype).reshape(4, 64)
    session = qlinear.Session(model, optimize=False)
    assert [s.spec.op_type for s in session._steps] == ["Gather"]
    (y,) = session.run(None, {"x": x})
    np.testing.assert_array_equal(y, np.take(table, x.astype(np.int32)))


def test_a_cast_that_is_also_read_elsewhere_stays() -> None:
    table = np.arange(256, dtype=np.float32)
    model = _model(
        [
            helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT32),
            helper.make_node("Gather", ["t", "i"], ["y"], axis=0),
        ],
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [8])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [8]),
            helper.make_tensor_value_info("i", TensorProto.INT32, [8]),
        ],
        [numpy_helper.from_array(table, "t")],
    )
    x = np.arange(8, dtype=np.uint8) * 30
    y, i = qlinear.Session(model, optimize=False).run(None, {"x": x})
    np.testing.assert_array_equal(i, x.astype(np.int32))
    np.testing.assert_array_equal(y, table[x])
