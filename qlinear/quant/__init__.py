"""One affine representation of quantization parameters (design.md §1).

``QuantParams`` (full-rank scale + zero point + dtype), the pure functions that
compute with it, and the only conversion to/from ONNX's compact Q/DQ form.
"""

from qlinear.quant.affine import (
    bias_qparams,
    choose_qparams,
    choose_qparams_for_tensor,
    dequantize_affine,
    quantize_affine,
)
from qlinear.quant.dtypes import (
    QUANT_DTYPES,
    QuantDType,
    from_onnx_type,
    is_quant_dtype,
    qrange,
    quant_dtype,
    to_onnx_type,
)
from qlinear.quant.granularity import (
    Granularity,
    PerAxis,
    PerBlock,
    PerGroup,
    PerTensor,
    block_size_for,
    scale_shape_for,
)
from qlinear.quant.onnx_form import from_onnx, to_onnx
from qlinear.quant.params import QuantParams

__all__ = [
    "QUANT_DTYPES",
    "Granularity",
    "PerAxis",
    "PerBlock",
    "PerGroup",
    "PerTensor",
    "QuantDType",
    "QuantParams",
    "bias_qparams",
    "block_size_for",
    "choose_qparams",
    "choose_qparams_for_tensor",
    "dequantize_affine",
    "from_onnx",
    "from_onnx_type",
    "is_quant_dtype",
    "qrange",
    "quant_dtype",
    "quantize_affine",
    "scale_shape_for",
    "to_onnx",
    "to_onnx_type",
]
