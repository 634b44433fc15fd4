"""The compare report: terminal table, JSON, Markdown with valid PNG charts, CLI errors."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qlinear.cli import compare as compare_cli
from qlinear.errors import QlinearError
from qlinear.report import compare, sqnr_db, write_report
from qlinear.report.metrics import ErrorStats, channel_range_ratio, format_db, outlier_ratio
from qlinear.report.suggest import suggest
from qlinear.report.text import render

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _models(tmp_path) -> tuple[str, str, str]:
    """A float MatMul->Relu->MatMul net, a copy with per-tensor-rounded weights, and data."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    w1[:, 0] *= 40  # one wide output channel: per-tensor scale wastes range
    w2 = rng.standard_normal((32, 10)).astype(np.float32)

    def build(a: np.ndarray, b: np.ndarray, name: str) -> str:
        nodes = [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["logits"], name="mm2"),
        ]
        graph = helper.make_graph(
            nodes,
            name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
            [numpy_helper.from_array(a, "w1"), numpy_helper.from_array(b, "w2")],
        )
        path = str(tmp_path / f"{name}.onnx")
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), path)
        return path

    def fake_quant(w: np.ndarray) -> np.ndarray:
        scale = np.abs(w).max() / 127
        return (np.round(w / scale) * scale).astype(np.float32)

    a = build(w1, w2, "float")
    b = build(fake_quant(w1), fake_quant(w2), "rounded")
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.standard_normal((6, 16)).astype(np.float32))
    return a, b, str(data)


def test_metrics_one_implementation():
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]], np.float32)
    assert sqnr_db(ref, ref) == math.inf and format_db(math.inf) == "exact"
    noisy = ref + 0.1
    assert sqnr_db(ref, noisy) == pytest.approx(10 * math.log10((ref**2).sum() / 0.06), rel=1e-6)
    stats = ErrorStats().update(ref, noisy[:, [1, 0, 2]], classifier=True)
    assert stats.top1 == 0.5
    assert outlier_ratio(np.r_[np.ones(10_000), 50.0]) == pytest.approx(50.0)
    assert channel_range_ratio(np.array([[1.0, -1.0], [0.1, 0.05]])) == pytest.approx(10.0)


def test_report_renders_tables_json_markdown_and_pngs(tmp_path):
    import matplotlib.image as mpimg

    a, b, data = _models(tmp_path)
    result = compare(a, b, data, batch_size=3)
    assert [r.name for r in result.layers] == ["x", "h", "r", "logits"]
    text = render(result)
    assert "SQNR dB" in text and "own dB" in text and "accum dB" in text
    header = next(line for line in text.splitlines() if line.startswith("tensor"))
    rows = text.splitlines()[text.splitlines().index(header) + 2 :][:4]
    assert len({row.index(" MatMul") for row in rows if " MatMul" in row}) == 1  # aligned

    folder = write_report(result, tmp_path / "report").parent
    md = (folder / "report.md").read_text()
    for png in ("sqnr_per_layer.png", "worst_layers_hist.png"):
        assert f"]({png})" in md
        raw = (folder / png).read_bytes()
        assert raw.startswith(PNG_SIGNATURE)
        image = mpimg.imread(folder / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    saved = json.loads((folder / "report.json").read_text())
    assert set(saved) >= {"model_a", "model_b", "outputs", "layers", "suggestions"}
    assert saved["layers"][0]["tensor"] == "h"  # worst own error: the wide-channel weights
    assert {"sqnr_db", "cosine", "max_abs_error", "top1_agreement"} <= set(saved["outputs"][0])
    assert not list(folder.glob("*.tmp"))


def test_suggestion_quotes_the_number_that_triggered_it(tmp_path):
    a, b, data = _models(tmp_path)
    result = compare(a, b, data, batch_size=6)
    # the fake-quantized model has no Q/DQ: give the rule a per-tensor weight to judge
    from qlinear.report.matching import WeightInfo

    layer = next(r for r in result.layers if r.name == "h")
    w1 = numpy_helper.to_array(onnx.load(a).graph.initializer[0])
    layer.weight = WeightInfo(w1, per_channel=False, channel_axis=1)
    tips = [s for s in suggest(result) if s.tensor == "h"]
    rule = next(s for s in tips if s.rule == "per_channel_weights")
    assert rule.value > 4 and f"{rule.value:.1f}x" in rule.reason


def _cli(argv: list[str]) -> int:
    """What `qlinear compare` does once registered in qlinear.cli._COMMANDS."""
    parser = argparse.ArgumentParser(prog="qlinear")
    compare_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prints_table_and_json(tmp_path, capsys):
    a, b, data = _models(tmp_path)
    assert _cli(["compare", a, b, "--data", data, "--quiet"]) == 0
    assert "Layers, worst own error first" in capsys.readouterr().out
    assert _cli(["compare", a, a, "--data", data, "--json", "--batch-size", "2"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["outputs"][0]["exact"] is True and parsed["batches"] == 3


@pytest.mark.parametrize(
    ("make_data", "message"),
    [
        (lambda p: np.savez(p, y=np.zeros((2, 16), np.float32)), "'y' is not a model input"),
        (lambda p: np.savez(p, x=np.zeros((2, 15), np.float32)), "input 'x' has samples"),
        (lambda p: np.savez(p, x=np.zeros((2, 16), np.float64)), "dtype float64"),
        (lambda p: np.savez(p, x=np.zeros((0, 16), np.float32)), "no samples"),
    ],
)
def test_cli_bad_data_is_one_clear_error(tmp_path, make_data, message):
    a, b, _ = _models(tmp_path)
    make_data(tmp_path / "bad.npz")
    with pytest.raises((QlinearError, ValueError)) as info:
        _cli(["compare", a, b, "--data", str(tmp_path / "bad.npz")])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_missing_model_is_one_clear_error(tmp_path):
    _, b, data = _models(tmp_path)
    with pytest.raises(QlinearError, match="does not exist"):
        _cli(["compare", str(tmp_path / "nope.onnx"), b, "--data", data])


def test_an_all_zero_weight_channel_is_named_not_printed_as_infx(tmp_path):
    a, b, data = _models(tmp_path)
    result = compare(a, b, data, batch_size=6)
    from qlinear.report.matching import WeightInfo

    layer = next(r for r in result.layers if r.name == "h")
    w1 = numpy_helper.to_array(onnx.load(a).graph.initializer[0]).copy()
    w1[:, 0] = 0.0  # one output channel (axis 1) of zeros: the spread is infinite
    layer.weight = WeightInfo(w1, per_channel=False, channel_axis=1)
    rule = next(s for s in suggest(result) if s.tensor == "h" and s.rule == "per_channel_weights")
    assert rule.value == float("inf")
    assert "infx" not in rule.reason and "all-zero channel" in rule.reason
