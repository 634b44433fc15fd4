"""Zoo models: qlinear's defaults at least match onnxruntime.quantization (same data)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from quantizer_models import ort_run, sqnr

from qlinear import zoo
from qlinear.quantizer import QuantConfig, quantize


def _ort_quantize(model: onnx.ModelProto, calib: list[dict], tmp_path) -> onnx.ModelProto:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self):  # noqa: ANN202
            return next(self.it, None)

    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(model, src)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)  # fmt: skip
    return onnx.load(dst)


@pytest.mark.parametrize("name", ["resnet", "bert"])
def test_zoo_sqnr_at_least_ort(name: str, tmp_path) -> None:
    model = zoo.build(name, "small")
    calib = zoo.calibration_batches(name, model, n=4, batch=4)
    feeds = zoo.example_inputs(name, model, batch=16, seed=7)
    ref = np.concatenate([o.ravel() for o in ort_run(model, feeds)])
    ours = quantize(model, calib, QuantConfig(progress=False))
    theirs = _ort_quantize(model, calib, tmp_path)
    s_ours = sqnr(ref, np.concatenate([o.ravel() for o in ort_run(ours, feeds)]))
    s_theirs = sqnr(ref, np.concatenate([o.ravel() for o in ort_run(theirs, feeds)]))
    assert s_ours >= s_theirs - 0.5, (s_ours, s_theirs)
    assert s_ours > 20
