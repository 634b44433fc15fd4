"""The quantized dtypes qlinear knows: numpy dtype, ONNX element type and value range.

One table, so that every module agrees on what "int4" means and where it saturates.
int4/uint4/int2/uint2 are the ``ml_dtypes`` types, which is what
``onnx.numpy_helper.to_array`` returns for those ONNX tensors. ``int32`` is listed
because DequantizeLinear reads int32 (biases quantized with ``x_scale * w_scale``);
the float8/float4 types are listed so the runtime Q/DQ ops can run them, but they
have no zero point and :func:`qlinear.quant.choose_qparams` does not choose for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
from onnx import TensorProto

from qlinear.errors import QuantParamsError


@dataclass(frozen=True)
class QuantDType:
    """One quantized element type."""

    name: str
    np_dtype: np.dtype
    onnx_type: int
    qmin: int | float
    qmax: int | float
    bits: int
    is_float: bool = False

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def is_integer(self) -> bool:
        return not self.is_float


def _int(name: str, dtype: Any, onnx_type: int) -> QuantDType:
    info = ml_dtypes.iinfo(dtype)
    return QuantDType(name, np.dtype(dtype), onnx_type, int(info.min), int(info.max), info.bits)


def _float(name: str, dtype: Any, onnx_type: int) -> QuantDType:
    info = ml_dtypes.finfo(dtype)
    return QuantDType(
        name, np.dtype(dtype), onnx_type, float(info.min), float(info.max), info.bits, True
    )


_TABLE: tuple[QuantDType, ...] = (
    _int("int8", np.int8, TensorProto.INT8),
    _int("uint8", np.uint8, TensorProto.UINT8),
    _int("int16", np.int16, TensorProto.INT16),
    _int("uint16", np.uint16, TensorProto.UINT16),
    _int("int4", ml_dtypes.int4, TensorProto.INT4),
    _int("uint4", ml_dtypes.uint4, TensorProto.UINT4),
    _int("int2", ml_dtypes.int2, TensorProto.INT2),
    _int("uint2", ml_dtypes.uint2, TensorProto.UINT2),
    _int("int32", np.int32, TensorProto.INT32),
    _float("float8e4m3fn", ml_dtypes.float8_e4m3fn, TensorProto.FLOAT8E4M3FN),
    _float("float8e4m3fnuz", ml_dtypes.float8_e4m3fnuz, TensorProto.FLOAT8E4M3FNUZ),
    _float("float8e5m2", ml_dtypes.float8_e5m2, TensorProto.FLOAT8E5M2),
    _float("float8e5m2fnuz", ml_dtypes.float8_e5m2fnuz, TensorProto.FLOAT8E5M2FNUZ),
    _float("float4e2m1", ml_dtypes.float4_e2m1fn, TensorProto.FLOAT4E2M1),
)

#: The integer types a quantizer produces (the affine core); int2 and int32 excluded.
QUANT_DTYPES: tuple[np.dtype, ...] = tuple(
    np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, ml_dtypes.int4, ml_dtypes.uint4)
)

_BY_DTYPE = {q.np_dtype: q for q in _TABLE}
_BY_ONNX = {q.onnx_type: q for q in _TABLE}
_BY_NAME = {q.name: q for q in _TABLE}


def quant_dtype(dtype: Any) -> QuantDType:
    """The table entry for a numpy/ml_dtypes dtype, a name ("int4") or an ONNX element type."""
    if isinstance(dtype, QuantDType):
        return dtype
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        entry = _BY_ONNX.get(int(dtype))
        if entry is None:
            raise QuantParamsError(f"ONNX element type {int(dtype)} is not a quantized type")
        return entry
    if isinstance(dtype, str) and dtype in _BY_NAME:
        return _BY_NAME[dtype]
    try:
        np_dtype = np.dtype(dtype)
    except TypeError as exc:
        raise QuantParamsError(f"{dtype!r} is not a dtype") from exc
    entry = _BY_DTYPE.get(np_dtype)
    if entry is None:
        raise QuantParamsError(f"{np_dtype} is not a quantized dtype")
    return entry


def qrange(dtype: Any) -> tuple[int | float, int | float]:
    """(qmin, qmax) of a quantized dtype."""
    q = quant_dtype(dtype)
    return q.qmin, q.qmax


def to_onnx_type(dtype: Any) -> int:
    """The ONNX TensorProto element type of a quantized dtype."""
    return quant_dtype(dtype).onnx_type


def from_onnx_type(elem_type: int) -> np.dtype:
    """The numpy dtype of an ONNX quantized element type."""
    return quant_dtype(int(elem_type)).np_dtype


def is_quant_dtype(dtype: Any) -> bool:
    """True if `dtype` is in the table (does not raise)."""
    try:
        quant_dtype(dtype)
    except QuantParamsError:
        return False
    return True
