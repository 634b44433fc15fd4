"""`qlinear quantize IN OUT --calib DATA`."""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import pytest
from quantizer_models import conv_net, ort_run, sqnr

from qlinear.cli import quantize as cli_quantize


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli_quantize.add_parser(sub)
    args = parser.parse_args(["quantize", *argv])
    return args.func(args)


def test_cli_quantizes_with_npz_data(tmp_path, capsys) -> None:
    src, out, data = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "calib.npz"
    onnx.save(conv_net(), src)
    before = src.read_bytes()
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.normal(size=(10, 3, 8, 8)).astype(np.float32))
    assert _run([str(src), str(out), "--calib", str(data), "--batch-size", "4",
                 "--no-progress", "--weight-asymmetric"]) == 0  # fmt: skip
    assert src.read_bytes() == before
    assert "QuantizeLinear" in capsys.readouterr().out
    feeds = {"x": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)}
    q = onnx.load(out)
    assert sqnr(ort_run(conv_net(), feeds)[0], ort_run(q, feeds)[0]) > 20


def test_cli_errors(tmp_path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(conv_net(), src)
    with pytest.raises(ValueError, match="needs --calib"):
        _run([str(src), str(tmp_path / "q.onnx")])
    with pytest.raises(ValueError, match="is the input file"):
        _run([str(src), str(src), "--calib", "x.npz"])
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((2, 3, 8, 8), np.float32))
    from qlinear.errors import InputError

    with pytest.raises(InputError, match="not a model input"):
        _run([str(src), str(tmp_path / "q.onnx"), "--calib", str(bad), "--no-progress"])
