"""qlinear: quantize ONNX models, fuse them into integer operators, run them on int8 kernels."""

from qlinear.errors import (
    ExternalDataError,
    InputError,
    InvalidModelError,
    ModelLoadError,
    QlinearError,
    QuantParamsError,
    UnsupportedOpError,
)
from qlinear.onnx_io import load_model, save_model
from qlinear.passes import optimize
from qlinear.quantizer import QuantConfig, calibrate, quantize
from qlinear.report import compare
from qlinear.runtime import NodeExecutionError, Session, TensorInfo

__version__ = "0.1.0"

__all__ = [
    "ExternalDataError",
    "InputError",
    "InvalidModelError",
    "ModelLoadError",
    "NodeExecutionError",
    "QlinearError",
    "QuantConfig",
    "QuantParamsError",
    "Session",
    "TensorInfo",
    "UnsupportedOpError",
    "calibrate",
    "compare",
    "optimize",
    "quantize",
    "load_model",
    "save_model",
]
