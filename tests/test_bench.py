"""`bench`: both engines end to end on a tiny model, the ratio, the profile, errors."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qlinear.bench import bench, make_inputs
from qlinear.cli import bench as bench_cli
from qlinear.errors import QlinearError
from qlinear.runtime.session import TensorInfo


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "w")],
    )
    path = tmp_path_factory.mktemp("bench") / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qlinear")
    bench_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_bench_cli_end_to_end_with_profile(tiny, capsys):
    start = time.perf_counter()
    assert _cli(["bench", tiny, "--runs", "3", "--warmup", "1", "--threads", "1", "--profile"]) == 0
    assert time.perf_counter() - start < 10
    out = capsys.readouterr().out
    assert "qlinear" in out and "onnxruntime" in out and "items/s" in out
    assert "ratio onnxruntime/qlinear = " in out
    profile = out[out.index("time per op type") :]
    assert "MatMul" in profile and "Relu" in profile and "%" in profile


def test_bench_json_and_ratio(tiny, capsys):
    assert _cli(["bench", tiny, "--runs", "3", "--rounds", "1", "--batch", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    q, o = report["engines"]["qlinear"], report["engines"]["onnxruntime"]
    assert report["batch"] == 4 and q["runs"] == 3
    assert report["ratio_ort_over_qlinear"] == pytest.approx(o["median_ms"] / q["median_ms"])
    assert q["items_per_s"] == pytest.approx(4 / (q["median_ms"] / 1e3))


def test_bench_qlinear_only_alternates_nothing(tiny):
    result = bench(tiny, runs=2, warmup=0, rounds=1, engines=("qlinear",))
    assert result.ratio is None and len(result.timings[0].times) == 2


def test_bench_errors(tmp_path, tiny):
    with pytest.raises(QlinearError, match="does not exist"):
        bench(tmp_path / "missing.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(onnx.load(tiny).SerializeToString()[:40])
    with pytest.raises(QlinearError):
        bench(broken, runs=1, rounds=1)
    with pytest.raises(ValueError, match="--runs"):
        bench(tiny, runs=0)


def test_synthetic_inputs_follow_the_model():
    feeds = make_inputs(
        [TensorInfo("ids", np.dtype(np.int64), ("N", "seq")), TensorInfo("m", None, (2, 3))], 3
    )
    assert feeds["ids"].shape == (3, 32) and feeds["ids"].dtype == np.int64
    assert feeds["m"].shape == (2, 3) and feeds["m"].dtype == np.float32
