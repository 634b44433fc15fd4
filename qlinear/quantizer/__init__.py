"""The quantizer: float ONNX + calibration data -> QDQ ONNX (static or dynamic)."""

from qlinear.quantizer.api import calibrate, quantize
from qlinear.quantizer.config import QuantConfig, SensitivityConfig, SmoothQuantConfig

__all__ = [
    "QuantConfig",
    "SensitivityConfig",
    "SmoothQuantConfig",
    "calibrate",
    "quantize",
]
