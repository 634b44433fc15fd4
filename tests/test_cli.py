"""The command line: results on good input, one clear line (no traceback) on bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qlinear.cli import main


def _save_tiny(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _qdq_model(tmp_path):
    """Per-channel int8 weights with per-tensor uint8 activations, and a blocked int4 DQ."""
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    scale = (np.abs(w).reshape(4, -1).max(1) / 127).astype(np.float32)
    wq = np.clip(np.rint(w / scale[:, None, None, None]), -127, 127).astype(np.int8)
    inits = [
        numpy_helper.from_array(wq, "wq"),
        numpy_helper.from_array(scale, "ws"),
        numpy_helper.from_array(np.zeros(4, np.int8), "wz"),
        numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
        numpy_helper.from_array(np.array(128, np.uint8), "xz"),
        helper.make_tensor("bq", TensorProto.INT4, [8, 16], np.zeros(128, np.int8)),
        numpy_helper.from_array(np.full((2, 16), 0.1, np.float32), "bs"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("DequantizeLinear", ["bq", "bs"], ["bd"], axis=0, block_size=4),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("bd", TensorProto.FLOAT, None),
        ],
        initializer=inits,
    )
    path = tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    return path


def test_run_prints_outputs_and_saves_them(tmp_path, capsys) -> None:
    model = _save_tiny(tmp_path)
    np.save(tmp_path / "x.npy", np.array([[-1, 2, -3], [4, -5, 6]], np.float32))
    out = tmp_path / "out"
    assert main(["run", str(model), "--input", f"x={tmp_path / 'x.npy'}", "-o", str(out)]) == 0
    assert "y: float32[2, 3]" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(out / "y.npy"), [[0, 2, 0], [4, 0, 6]])


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda p, m: ["run", str(p / "missing.onnx")], "does not exist"),
        (lambda p, m: ["run", str(m), "-i", f"z={p / 'x.npy'}"], "unknown input 'z'"),
        (lambda p, m: ["run", str(m), "-i", f"x={p / 'x64.npy'}"], "input 'x' has dtype float64"),
        (lambda p, m: ["run", str(m), "-i", f"x={p / 'bad.npy'}"], "input 'x' has shape (4,)"),
        (lambda p, m: ["run", str(p / "junk.onnx")], "not a valid ONNX model"),
    ],
)
def test_run_bad_input_is_one_line_without_traceback(tmp_path, make_args, message) -> None:
    model = _save_tiny(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.float32))
    np.save(tmp_path / "x64.npy", np.zeros((2, 3), np.float64))
    np.save(tmp_path / "bad.npy", np.zeros(4, np.float32))
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage" * 5)
    proc = subprocess.run(
        [sys.executable, "-m", "qlinear", *make_args(tmp_path, model)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_inspect_lists_ops_granularity_and_fallbacks(tmp_path, capsys) -> None:
    assert main(["inspect", str(_qdq_model(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "DequantizeLinear   int8    per-channel (axis 0)" in out
    assert "QuantizeLinear     uint8   per-tensor" in out
    assert "DequantizeLinear   int4    blockwise (axis 0, block 4)" in out
    assert "falls back to onnx.reference: nothing" in out


def test_inspect_names_ops_that_would_fall_back(tmp_path, capsys) -> None:
    graph = helper.make_graph(
        [helper.make_node("Floor", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "floor.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert main(["inspect", str(path), "--json"]) == 0
    assert '"runs_in": "onnx.reference (slow)"' in capsys.readouterr().out


def test_demo_runs_the_bundled_example(tmp_path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ops in onnx.reference: none" in out
    assert "10 of 10 Conv/MatMul/Gemm fused into integer ops, 0 left float" in out
    assert "top-1 agreement" in out
    for stage in ("float", "qdq", "int8"):
        assert (tmp_path / f"resnet_{stage}.onnx").exists()
